"""The MLP's activation, silu(gate) * up over the halves of the packed gate/up projection: PyTorch's two operators,
or the kit's native kernel on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atb_models.kernels.native import kernel_name


class SiluAndMul:
    """PyTorch's silu and product."""

    name = "torch"

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class NativeSiluAndMul(SiluAndMul):
    """One call of atb_models/csrc/activation.h (either native library's): float32, or bfloat16 rows rounded where
    PyTorch's two bfloat16 operators round (the AVX-512 library's: a bfloat16 model's prefill), where gate and up are
    the two halves of the gate/up projection's output (same shape, rows equally far apart). Below MIN_ELEMENTS the
    ctypes call costs more than PyTorch's two operators, which then run instead."""

    name = "native"
    MIN_ELEMENTS = 16384

    def __init__(self, library):
        self._ops = {torch.float32: library.atb_silu_and_mul_f32}
        if library.isa == "avx512":
            self._ops[torch.bfloat16] = library.atb_silu_and_mul_bf16
        self.name = kernel_name(self.name, library)

    def suits(self, gate: torch.Tensor, up: torch.Tensor) -> bool:
        return (gate.device.type == "cpu" and gate.dtype == up.dtype and gate.dtype in self._ops and gate.dim() == 2
                and gate.shape == up.shape and gate.stride() == up.stride() and gate.stride(1) == 1
                and gate.numel() >= self.MIN_ELEMENTS)

    def __call__(self, gate, up):
        if not self.suits(gate, up):
            return super().__call__(gate, up)
        out = torch.empty(gate.shape, dtype=gate.dtype)
        self._ops[gate.dtype](gate.data_ptr(), up.data_ptr(), gate.shape[0], gate.shape[1], gate.stride(0),
                              out.data_ptr())
        return out
