"""The vision tower's elementwise operators: the rotary on q and k, and quick-GELU (Qwen2-VL's MLP activation).
PyTorch's operators, or the kit's native kernels on the CPU (atb_models/csrc/vision.h), which work in place on the
projection's output where PyTorch makes a fresh tensor of all the step's patches per operator. The one call costs
less than PyTorch's operators at any size (docs/PERFORMANCE.md), so there is no threshold."""

from __future__ import annotations

import torch

from atb_models.kernels.native import kernel_name
from atb_models.layers.rotary import apply_rotary


class VisionRotary:
    """q and k [patches, heads, head_dim] rotated by cos and sin [patches, head_dim] (float32), in float32 whatever
    the tower's dtype, as the reference rotates them; returns the rotated (q, k). A kernel may rotate q and k in
    place: the caller hands over tensors it owns and no longer needs unrotated."""

    name = "torch"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return (apply_rotary(q.float(), cos, sin).to(q.dtype), apply_rotary(k.float(), cos, sin).to(k.dtype))


class NativeVisionRotary(VisionRotary):
    """One call of atb_vision_rotary_f32 / _bf16 (either native library's), q and k rotated in place: each product
    and sum rounded to float32 as PyTorch's operators round them, then to the tower's dtype. For views of one qkv
    output with equal strides, each head row contiguous, q's heads and k's apart in every row (the kernel's threads
    write rows side by side)."""

    name = "native"

    def __init__(self, library):
        self._ops = {torch.float32: library.atb_vision_rotary_f32, torch.bfloat16: library.atb_vision_rotary_bf16}
        self.name = kernel_name(self.name, library)

    def suits(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        rows, heads, dim = q.shape
        if not (q.device.type == "cpu" and q.dtype == k.dtype and q.dtype in self._ops and q.shape == k.shape
                and q.stride() == k.stride() and q.stride(2) == 1 and q.stride(1) == dim and dim % 2 == 0
                and cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (rows, dim)
                and cos.is_contiguous() and sin.is_contiguous()):
            return False
        offset, remainder = divmod(k.data_ptr() - q.data_ptr(), q.element_size())
        return remainder == 0 and _rows_apart(offset, q.stride(0), heads * dim, rows)

    def __call__(self, q, k, cos, sin):
        if not self.suits(q, k, cos, sin):
            return super().__call__(q, k, cos, sin)
        rows, heads, dim = q.shape
        self._ops[q.dtype](q.data_ptr(), k.data_ptr(), rows, heads, dim, q.stride(0), cos.data_ptr(),
                           sin.data_ptr())
        return q, k


def _rows_apart(offset: int, stride: int, width: int, rows: int) -> bool:
    """Whether rows [r * stride, r * stride + width) and [offset + r * stride, ...), r < rows, never meet: each row
    of one at least `width` values from each row of the other. |offset + d * stride| over d in (-rows, rows) is
    least at the whole d nearest -offset / stride, within the range."""
    if rows == 1 or stride == 0:
        return abs(offset) >= width
    nearest = -offset // stride
    return all(abs(offset + min(max(d, 1 - rows), rows - 1) * stride) >= width for d in (nearest, nearest + 1))


class QuickGelu:
    """x * sigmoid(1.702 x), as transformers' QuickGELUActivation."""

    name = "torch"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class NativeQuickGelu(QuickGelu):
    """One call of atb_quick_gelu_f32 / _bf16 (either native library's) over a contiguous tensor, in place (the
    caller hands over a tensor it no longer needs: the MLP's first projection); bfloat16 rounded after each of the
    three operators, as PyTorch's bfloat16 operators round."""

    name = "native"

    def __init__(self, library):
        self._ops = {torch.float32: library.atb_quick_gelu_f32, torch.bfloat16: library.atb_quick_gelu_bf16}
        self.name = kernel_name(self.name, library)

    def __call__(self, x):
        if not (x.device.type == "cpu" and x.dtype in self._ops and x.is_contiguous()):
            return super().__call__(x)
        self._ops[x.dtype](x.data_ptr(), x.numel())
        return x
