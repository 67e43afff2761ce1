"""Weight-only int8 linears (W8A16): y = x (W_int8 * scale)^T + b, activations in the compute dtype.

The weights are symmetric int8 with float32 scales, one per output channel or per group of `group_size` input
columns: `quantize` makes them (the quantize tool and quantize-at-load share it), scale [out, groups] where groups
= in / group_size (1 for per-channel). A decode step reads a quarter of float32's weight bytes.

Kernels take (x, weight, bias, scale) where weight is the int8 [out, in] tensor or the layout `pack` made of it:
- NativeW8A16: the kit's own CPU kernel (atb_models/csrc/w8a16_linear.h, AVX-512), on weights packed in groups
  of 64 output columns with pairs of input columns side by side, [out / 64, in / 2, 64, 2] int8, against the
  activations quantized per block to int16 (16-bit activations) in integer multiply-adds; where the CPU has
  AMX-INT8, on the tiles instead (quads of input columns, [out / 64, 2, in / 4, 32, 4]), to the same bits;
- NpuW8A16: the NPU's fused op, torch_npu.npu_weight_quant_batchmatmul;
- TorchW8A16: PyTorch's `_weight_int8pack_mm` for per-channel scales where it runs (CPU, and accelerators whose
  build has it), else the weight dequantized in the activation dtype on each call: right everywhere, not fast.
`w8a16_kernel` chooses among them for a plan.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from atb_models import platform
from atb_models.host import HugePages
from atb_models.kernels.linear import PANEL_GROUP, amx_tiles_allowed, packed_copy, pair_layout

logger = logging.getLogger("atb_models.kernels")

QMAX = 127  # symmetric: -127..127, so the scale maps max |w| to 127 exactly
TILE_STEPS = 64  # input columns of one int8 product on the tiles (csrc/w8a16_linear.h's QUAD_STEPS)


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

    def pack(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
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


class NativeW8A16:
    """The kit's W8A16 kernel for the CPU (atb_models/csrc/w8a16_linear.h): int8 weights packed by `pack` in groups
    of 64 output columns, each column's weights of a pair of input columns side by side ([out / 64, in / 2, 64, 2]),
    streamed and sign-extended to int16 in registers; the activations quantized on entry to int16, per row and per
    block of up to 512 input columns within a scale group (scale: the block's largest magnitude / 32767), so that a
    product is VNNI's int16 multiply-add into int32; each block's sums scaled into float32 by the activation's and
    the weights' scales (per channel or per group). Activations of other dtypes (bfloat16) are read as float32 and
    the result returned in theirs. Weights it did not pack (an output size off the groups, an odd input size or
    scale group) go to `fallback`.

    With `tiles_op` (the CPU has AMX-INT8: w8a16_kernel), weights whose input size and scale groups are multiples of
    64 are packed for the tiles instead (tile_layout), where each activation's two bytes multiply apart into int32:
    the same block sums, so the same outputs bit for bit, from a quarter of the instructions (docs/PERFORMANCE.md)."""

    name = "native"

    def __init__(self, native_op, fallback: TorchW8A16, tiles_op=None):
        self._native = native_op
        self._fallback = fallback
        self._tiles = tiles_op
        self.pages = HugePages()  # where pack lays the weights, one after another
        if tiles_op is not None:
            self.name = "native, AMX-INT8 tiles"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 scale: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 4:  # pair_layout
            op, in_features = self._native, 2 * weight.shape[1]
        elif weight.dim() == 5:  # tile_layout
            if self._tiles is None:
                raise ValueError("an int8 weight packed for AMX tiles reached a W8A16 kernel without them")
            op, in_features = self._tiles, 4 * weight.shape[2]
        else:
            return self._fallback(x, weight, bias, scale)
        out_features = weight.shape[0] * PANEL_GROUP
        rows = x.reshape(-1, in_features)
        if rows.stride(-1) != 1 or rows.dtype != torch.float32:
            rows = rows.contiguous().float()
        scale = scale.float().contiguous()
        if bias is not None:
            bias = bias.float().contiguous()
        y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
        if rows.shape[0]:
            op(rows.data_ptr(), rows.shape[0], in_features, rows.stride(0), weight.data_ptr(), out_features,
               scale.data_ptr(), scale.shape[-1], None if bias is None else bias.data_ptr(), y.data_ptr())
        return y.view(*x.shape[:-1], out_features).to(x.dtype)

    def pack(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """[out, in] int8 -> [out / 64, in / 2, 64, 2]: group g, pair p, column c holds W[64g + c, 2p : 2p + 2]; or,
        for the tiles, tile_layout's [out / 64, 2, in / 4, 32, 4]. None where the kernel does not take the weight:
        out not a multiple of 64, in (or, given `scale` [out, groups], a scale group) of an odd size."""
        if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[0] % PANEL_GROUP:
            return None
        out_features, in_features = weight.shape
        groups = 1 if scale is None else scale.shape[-1]
        group = in_features // groups
        if in_features % 2 or group % 2 or in_features % groups:
            return None
        if self._tiles is not None and in_features % TILE_STEPS == 0 and group % TILE_STEPS == 0:
            return tile_layout(weight, self.pages)
        return pair_layout(weight, self.pages)


def tile_shape(out_features: int, in_features: int) -> tuple:
    """The shape tile_layout gives an [out, in] int8 weight: [out / 64, 2, in / 4, 32, 4]."""
    return out_features // PANEL_GROUP, 2, in_features // 4, PANEL_GROUP // 2, 4


def tile_layout(weight: torch.Tensor, pages: HugePages | None = None) -> torch.Tensor:
    """[out, in] int8 -> tile_shape's [out / 64, 2, in / 4, 32, 4] (out a multiple of 64, in of 4): group g, half h,
    quad u, column c holds W[64g + 32h + c, 4u : 4u + 4], the four bytes an AMX-INT8 tile multiplies in a 32-bit
    lane; each half of a group (32 columns) is one stream over the input columns. On huge pages where it can."""
    out_features, in_features = weight.shape
    halves = weight.reshape(out_features // PANEL_GROUP, 2, PANEL_GROUP // 2, in_features // 4, 4)
    return packed_copy(halves.transpose(2, 3), pages)


class NpuW8A16:
    """The NPU's fused W8A16 matmul, torch_npu.npu_weight_quant_batchmatmul: x [M, K] (float16 or bfloat16)
    against the int8 weight as (K, N) (the [out, in] weight transposed, a view, as Ascend recommends for per-channel
    scales), antiquant_scale in x's dtype, (N,) per channel or (groups, N) with antiquant_group_size per group."""

    name = "npu_weight_quant_batchmatmul"

    def __init__(self, op):
        self._op = op
        # id(scale) -> (a reference to it, dtype, scale as the op takes it), made once (tensors compare by value,
        # so they cannot key a WeakKeyDictionary)
        self._scales = {}

    def __call__(self, x, weight, bias, scale):
        rows = x.reshape(-1, x.shape[-1])
        groups = scale.shape[-1]
        y = self._op(rows, weight.t(), self._antiquant_scale(scale, x.dtype),
                     antiquant_group_size=0 if groups == 1 else weight.shape[1] // groups)
        y = y.view(*x.shape[:-1], weight.shape[0])
        # Added here, not passed to the op: its bias must be float32 for bfloat16 activations on some chips.
        return y if bias is None else y + bias

    def _antiquant_scale(self, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ref, made_for, converted = self._scales.get(id(scale), (None, None, None))
        if ref is None or ref() is not scale or made_for != dtype:
            converted = (scale.reshape(-1) if scale.shape[-1] == 1 else scale.t()).to(dtype).contiguous()
            self._scales[id(scale)] = (weakref.ref(scale), dtype, converted)
        return converted

    def pack(self, weight, scale=None):
        return None


def w8a16_kernel(plan, library=None):
    """The W8A16 kernel for a plan's device: on the CPU the kit's native kernel where `library` (the loaded
    kernels.native.NativeLibrary, or None) is there and multiplies right, on an NPU the fused op where torch_npu
    has it, else PyTorch's operators (TorchW8A16)."""
    if plan.kind == "npu":
        torch_npu = platform._import_torch_npu()
        op = getattr(torch_npu, "npu_weight_quant_batchmatmul", None)
        if op is not None:
            return NpuW8A16(op)
        logger.info("this torch_npu has no npu_weight_quant_batchmatmul: int8 weights are dequantized on each call")
        return TorchW8A16()  # PyTorch's int8 matmul has no NPU kernel
    fallback = TorchW8A16(torch._weight_int8pack_mm if _int8pack_mm_runs(plan.device) else None)
    if plan.kind == "cpu" and library is not None and _native_products_right(library.atb_w8a16_linear_f32, fallback):
        return NativeW8A16(library.atb_w8a16_linear_f32, fallback, _tiles_op(library))
    return fallback


def _tiles_op(library):
    """The library's W8A16 kernel on AMX-INT8 tiles where this build and process have them, the tiles are allowed
    (linear.amx_tiles_allowed) and its outputs are the vector kernel's bit for bit on a small case; else None."""
    tiles_op = getattr(library, "atb_w8a16_tiles_linear_f32", None)
    if tiles_op is None or not amx_tiles_allowed() or not library.atb_w8a16_tiles_available():
        return None
    vectors = NativeW8A16(library.atb_w8a16_linear_f32, TorchW8A16())
    tiles = NativeW8A16(library.atb_w8a16_linear_f32, TorchW8A16(), tiles_op)
    generator = torch.Generator().manual_seed(0)
    # Two groups (four halves), K of two scale groups, the register blocks' rows and the tiles' (two row blocks).
    q, s = quantize(torch.randn(2 * PANEL_GROUP, 2 * TILE_STEPS, generator=generator), group_size=TILE_STEPS)
    b = torch.randn(2 * PANEL_GROUP, generator=generator)
    for rows in (3, 21):
        x = torch.randn(rows, 2 * TILE_STEPS, generator=generator)
        if not torch.equal(tiles(x, tiles.pack(q, s), b, s), vectors(x, vectors.pack(q, s), b, s)):
            logger.warning("the kit's W8A16 kernel on AMX tiles gave other products than its vector kernel here: "
                           "using the vector kernel")
            return None
    return tiles_op


def _native_products_right(op, fallback: TorchW8A16) -> bool:
    """A wrong build must not reach the model: one small product (two column groups, five scale groups, a bias)
    against the dequantized weight first."""
    kernel = NativeW8A16(op, fallback)
    generator = torch.Generator().manual_seed(0)
    q, s = quantize(torch.randn(2 * PANEL_GROUP, 40, generator=generator), group_size=8)
    x, b = torch.randn(3, 40, generator=generator), torch.randn(2 * PANEL_GROUP, generator=generator)
    # Its activations are 16-bit: within about 1e-4 of float32's product here.
    if torch.allclose(kernel(x, kernel.pack(q, s), b, s), F.linear(x, dequantize(q, s), b), atol=1e-3, rtol=1e-3):
        return True
    logger.warning("the kit's W8A16 kernel gave wrong products here: using PyTorch's operators")
    return False
