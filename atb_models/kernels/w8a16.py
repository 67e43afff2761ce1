"""Weight-only int8 linears (W8A16): y = x (W_int8 * scale)^T + b, activations in the compute dtype.

The weights are symmetric int8 with float32 scales, one per output channel or per group of `group_size` input
columns: `quantize` makes them (the quantize tool and quantize-at-load share it), scale [out, groups] where groups
= in / group_size (1 for per-channel). A decode step reads a quarter of float32's weight bytes.

Kernels take (x, weight, bias, scale) where weight is the int8 [out, in] tensor or the layout `pack` made of it:
- TorchW8A16: PyTorch's `_weight_int8pack_mm` for per-channel scales where it runs (CPU, and accelerators whose
  build has it), else the weight dequantized in the activation dtype on each call: right everywhere, not fast;
- the kit's native CPU kernel and the NPU's fused op are chosen by `w8a16_kernel`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("atb_models.kernels")

QMAX = 127  # symmetric: -127..127, so the scale maps max |w| to 127 exactly


def quantize(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], float32 scale [out, groups]) for a float weight [out, in]; computed in float32, whatever
    the weight's dtype, so the tool and quantize-at-load give the same bytes. A row (or group) of zeros gets scale
    1 and zeros."""
    w = weight.float()
    out_features, in_features = w.shape
    group = in_features if group_size is None else group_size
    if in_features % group:
        raise ValueError(f"group size {group} does not divide {in_features} input columns")
    grouped = w.reshape(out_features, in_features // group, group)
    amax = grouped.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(grouped / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.reshape(out_features, in_features), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [out, in] an int8 weight and its scales stand for."""
    out_features, in_features = q.shape
    groups = scale.shape[-1]
    w = q.float().reshape(out_features, groups, in_features // groups) * scale.float().unsqueeze(-1)
    return w.reshape(out_features, in_features).to(dtype)


class TorchW8A16:
    """PyTorch's operators: `_weight_int8pack_mm` (per-channel scales; x of float32, bf16 or fp16), else the
    dequantized weight through F.linear."""

    name = "torch"

    def __init__(self, int8pack_mm=None):
        self._int8pack_mm = int8pack_mm

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 scale: torch.Tensor) -> torch.Tensor:
        if self._int8pack_mm is not None and scale.shape[-1] == 1:
            rows = x.reshape(-1, x.shape[-1])
            y = self._int8pack_mm(rows.contiguous(), weight, scale.reshape(-1).to(x.dtype))
            y = y.view(*x.shape[:-1], weight.shape[0])
            return y if bias is None else y + bias
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)

    def pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        return None


def _int8pack_mm_runs(device: torch.device) -> bool:
    op = getattr(torch, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        x = torch.ones(1, 32, device=device)
        y = op(x, torch.ones(64, 32, dtype=torch.int8, device=device), torch.ones(64, device=device))
        return bool(torch.allclose(y.cpu(), torch.full((1, 64), 32.0)))
    except Exception:  # noqa: BLE001 - a build or device without the op, in whatever way it says so
        return False


def w8a16_kernel(plan) -> TorchW8A16:
    """The W8A16 kernel for a plan's device."""
    return TorchW8A16(torch._weight_int8pack_mm if _int8pack_mm_runs(plan.device) else None)
