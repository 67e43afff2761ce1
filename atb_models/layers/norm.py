import torch
from torch import nn

# The CPU's native RMSNorm (platform.rms_norm_kernel), set once by the model runner; None: PyTorch's operators.
_native = None


def set_rms_norm_kernel(kernel) -> None:
    global _native
    _native = kernel


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: statistics in float32 whatever the activation dtype, scale applied in the input dtype."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native is not None and _native.suits(x):
            return _native(x, self.weight, self.eps)[1]
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and the norm of its result: (x + delta, norm(x + delta))."""
        if _native is not None and _native.suits(x) and delta.dtype == x.dtype:
            return _native(x, self.weight, self.eps, delta)
        x = x + delta
        return x, self(x)
