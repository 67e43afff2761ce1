"""Qwen2's RMSNorm as a layer: its weight and eps; the computation is the model's Kernels.rms_norm."""
import torch
from torch import nn

from atb_models.kernels.norm import RMSNormKernel


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), statistics in float32 (kernels.norm.RMSNormKernel)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, kernel: RMSNormKernel):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and the norm of its result: (x + delta, norm(x + delta))."""
        return self.kernel.add_and_norm(x, delta, self.weight, self.eps)
