"""The language model's MLP activation: silu(gate) * up over the halves of the packed gate/up projection."""
import torch
import torch.nn.functional as F

# The CPU's native silu-and-multiply (platform.silu_and_mul_kernel), set once by the model runner; None: PyTorch.
_native = None


def set_silu_and_mul_kernel(kernel) -> None:
    global _native
    _native = kernel


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if _native is not None and _native.suits(gate, up):
        return _native(gate, up)
    return F.silu(gate) * up
