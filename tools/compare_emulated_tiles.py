"""On a CPU with AMX: whether the emulated tiles (csrc/amx_emulated.h) give the hardware's sums bit for bit.

    python tools/compare_emulated_tiles.py

The emulation adds TDPBF16PS's products in the order Intel's manual describes (per output, the even and the odd
products each a chain of fused multiply-adds over the instruction's 32 k-steps, then their sum added to the
destination). The kit measured its AMX CPU's sums as neither of vdpbf16ps's orders nor one rounding a pair
(csrc/amx_linear.h). If the hardware's order is the manual's, this prints "bit for bit" for both products, and a
vector kernel adding in that order would give a row the tiles' sums: one row could then stream by vector loads
(which the AMX Xeon measured faster than the tiles at one row: docs/PERFORMANCE.md) without a row's sums depending
on its batch. Otherwise it prints how far apart the two are. Loads the AVX-512 library twice, as the CPU builds it
and with ATB_MODELS_AMX_EMULATED=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atb_models.kernels import native  # noqa: E402
from atb_models.kernels.linear import panel_layout  # noqa: E402


def library(emulated: bool) -> native.NativeLibrary:
    os.environ[native.AMX_EMULATED_ENV] = "1" if emulated else "0"
    loaded = native.NativeLibrary.load()
    if loaded is None or not loaded.atb_bf16_amx_available():
        sys.exit(f"no {'emulated' if emulated else 'hardware'} AMX tiles here: a CPU without AMX, Linux refusing "
                 "them, or a library that did not build")
    return loaded


def products(lib, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """A bfloat16 model's product (the inputs' bfloat16 values) and a float32 model's (three parts) by the tiles."""
    was = lib.atb_bf16_use_amx(1), lib.atb_f32_use_amx(1)
    try:
        out = {}
        for name, op, rows in (("bfloat16", lib.atb_bf16_dot_linear_f32, x.bfloat16().float()),
                               ("float32 in three parts", lib.atb_bf16_linear_f32, x)):
            y = torch.empty(x.shape[0], packed.shape[0] * 64)
            op(rows.data_ptr(), x.shape[0], x.shape[1], x.shape[1], packed.data_ptr(), y.shape[1], bias.data_ptr(),
               y.data_ptr())
            out[name] = y
        return out
    finally:
        lib.atb_bf16_use_amx(was[0])
        lib.atb_f32_use_amx(was[1])


def main() -> None:
    hardware, emulated = library(False), library(True)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 896, generator=generator).bfloat16()
    bias = torch.randn(512, generator=generator)
    packed = panel_layout(weight)
    for rows in (1, 16, 40):
        x = torch.randn(rows, 896, generator=generator)
        ours, theirs = products(emulated, x, packed, bias), products(hardware, x, packed, bias)
        for name in ours:
            differ = (ours[name] != theirs[name]).sum().item()
            scale = theirs[name].abs().clamp_min(1e-30)
            worst = ((ours[name] - theirs[name]).abs() / scale).max().item()
            verdict = "bit for bit" if differ == 0 else f"{differ} of {ours[name].numel()} differ, worst {worst:.2e}"
            print(f"{name}, {rows} rows: {verdict}")


if __name__ == "__main__":
    main()
