"""What the hardware allows: the machine's memory bandwidth and matrix rate, measured in the benchmark's own
process, and the decode-step floor they give.

A decode step at batch B reads every weight of the language model once (the embedding table excepted: decode
gathers B rows of it) and does 2 * params * B floating-point operations, so it cannot take less than
max(weight bytes / bandwidth, 2 * params * B / matrix rate). The KV cache read is left out, as the issue's floor
defines it: at the decode workload's context lengths (about 120 tokens) it adds 0.2% to the bytes at batch 1 and
3% at batch 16.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Machine:
    bandwidth: float      # bytes/s, reading a tensor much larger than the last-level cache
    matmul_rate: float    # floating-point operations/s of the model's MLP matmuls in its dtype

    def best_of(self, other: "Machine") -> "Machine":
        return Machine(max(self.bandwidth, other.bandwidth), max(self.matmul_rate, other.matmul_rate))


def best_seconds(work: Callable[[], object], synchronize: Callable[[], None], repeats: int) -> float:
    """The fastest of `repeats` timed runs after one untimed one: other load on the machine only slows a run, so
    the fastest is the closest to what the hardware does."""
    work()
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(device: torch.device, num_bytes: int, synchronize: Callable[[], None],
                      repeats: int = 5) -> float:
    """Bytes per second of summing a float32 tensor of num_bytes: a pure read, as the weights are in decode."""
    data = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    return data.numel() * 4 / best_seconds(data.sum, synchronize, repeats)


def measure_matmul_rate(kernels: list, device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int,
                        synchronize: Callable[[], None], tokens: int = 256, repeats: int = 5) -> float:
    """Operations per second of an MLP's two matmuls on `tokens` rows (enough rows to be compute-bound), with the
    fastest of `kernels` (functions like F.linear), each on plain and on packed weights: on the CPU oneDNN's linear
    runs about twice MKL's GEMM, and the floor must not rest on the slower one."""
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    up = torch.randn(intermediate, hidden, dtype=dtype, device=device) / hidden ** 0.5
    down = torch.randn(hidden, intermediate, dtype=dtype, device=device) / intermediate ** 0.5
    seconds = float("inf")
    for kernel in kernels:
        for a, b in {(up, down), (_packed(kernel, up), _packed(kernel, down))}:
            seconds = min(seconds, best_seconds(lambda: kernel(kernel(x, a), b), synchronize, repeats))
    return 2 * 2 * tokens * hidden * intermediate / seconds


def _packed(kernel, weight: torch.Tensor) -> torch.Tensor:
    """The weight in the layout the kernel reads fastest (itself if the kernel has none)."""
    layout = kernel.pack(weight) if hasattr(kernel, "pack") else None
    return weight if layout is None else layout


def measure_machine(plan, hidden: int, intermediate: int, bandwidth_bytes: int) -> Machine:
    """The machine as a plan's device and dtype see it; the matrix rate with F.linear, oneDNN's linear and the kit's
    own kernel (whichever is fastest at 256 rows sets the rate)."""
    from atb_models.kernels.linear import PLAIN_LINEAR, linear_kernel

    kernels = [F.linear]
    for kernel in (linear_kernel(plan, "onednn"), linear_kernel(plan)):
        # Each kind once: where the kit's kernel is oneDNN's, or F.linear (accelerators), it is already timed.
        if kernel is not PLAIN_LINEAR and all(type(kernel) is not type(k) for k in kernels):
            kernels.append(kernel)
    return Machine(measure_bandwidth(plan.device, bandwidth_bytes, plan.synchronize),
                   measure_matmul_rate(kernels, plan.device, plan.llm_dtype, hidden, intermediate, plan.synchronize))


def decode_params(reference) -> int:
    """Parameters a decode step reads: transformers' language model without its embedding table, plus the LM head
    (counted once when it shares the embedding's tensor). `reference`: engines.LocalReference or
    oracle.RemoteReference (its parameter sizes by name)."""
    language_model = sum(size for name, size in reference.language_model_sizes if not name.startswith("embed_tokens."))
    return language_model + reference.lm_head_size


def kit_decode_bytes(model) -> int:
    """Bytes a decode step of the kit's model reads, counted as decode_params counts parameters but in the
    parameters' own widths: int8 weights, their float32 scales, float norms and LM head (a quantized model)."""
    language_model = sum(p.numel() * p.element_size() for name, p in model.model.named_parameters()
                         if not name.startswith("embed_tokens."))
    head = model.lm_head
    return language_model + sum(p.numel() * p.element_size() for p in head.parameters())


def decode_floor(params: int, bytes_per_param: int, batch_size: int, machine: Machine,
                 weight_bytes: int | None = None) -> float:
    """Seconds a decode step of batch_size sequences cannot beat: reading the weights (params * bytes_per_param,
    or `weight_bytes` where the widths differ: int8) or their multiply-adds at the matrix rate, whichever is more."""
    read = params * bytes_per_param if weight_bytes is None else weight_bytes
    return max(read / machine.bandwidth, 2 * params * batch_size / machine.matmul_rate)
