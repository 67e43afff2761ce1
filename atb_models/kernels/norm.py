"""Qwen2's RMSNorm, alone or after the residual add: PyTorch's operators, or the kit's native kernel on the CPU."""

from __future__ import annotations

import torch

from atb_models.kernels.native import kernel_name


class RMSNormKernel:
    """PyTorch's operators: statistics in float32 whatever the activation dtype, scale applied in the input dtype
    (as the reference computes it)."""

    name = "torch"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(input_dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and the norm of its result: (x + delta, norm(x + delta))."""
        x = x + delta
        return x, self(x, weight, eps)


class NativeRMSNorm(RMSNormKernel):
    """One call of atb_models/csrc/rms_norm.h (cpu_kernels_avx2.cpp's on a CPU with AVX2 but not AVX-512), the
    residual add included: float32 rows, contiguous; other inputs go through PyTorch's operators."""

    name = "native"

    def __init__(self, library):
        self._op = library.atb_rms_norm_f32
        self.name = kernel_name(self.name, library)

    @staticmethod
    def suits(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()

    def __call__(self, x, weight, eps):
        if not self.suits(x):
            return super().__call__(x, weight, eps)
        return self._native(x, weight, eps, None)[1]

    def add_and_norm(self, x, delta, weight, eps):
        if not self.suits(x) or delta.dtype != x.dtype:
            return super().add_and_norm(x, delta, weight, eps)
        return self._native(x, weight, eps, delta)

    def _native(self, x, weight, eps, delta):
        hidden = x.shape[-1]
        rows = x.numel() // hidden
        out = torch.empty_like(x)
        total = x
        if delta is not None:
            delta = delta.contiguous()
            total = torch.empty_like(x)
        self._op(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), rows, hidden, eps,
                 None if delta is None else total.data_ptr(), out.data_ptr())
        return total, out
