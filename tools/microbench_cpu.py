"""Microbenchmarks behind the CPU optimisation steps of docs/PERFORMANCE.md, on cpu-small's shapes (float32).

    python tools/microbench_cpu.py linear      # 24 MLP layers: oneDNN (plain, packed) vs the kit's panel kernel
    python tools/microbench_cpu.py attention   # one layer's decode attention: SDPA, grouped matmuls, native

Each figure is the best of several timed runs after one untimed run (other load only slows a run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atb_models.benchmark.floors import best_seconds  # noqa: E402
from atb_models.kernels import Kernels  # noqa: E402
from atb_models.kernels.attention import (CpuDecodeAttention, NativeDecodeAttention,  # noqa: E402
                                          grouped_decode_attention, store_kv)
from atb_models.kernels.linear import OneDnnLinear, PanelLinear, linear_kernel  # noqa: E402
from atb_models.platform import resolve_plan  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 896, 4864, 24  # Qwen2-0.5B's MLP
HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64


def best_ms(work, repeats: int) -> float:
    return best_seconds(work, lambda: None, repeats) * 1000


def bench_linear(repeats: int, row_counts: list) -> None:
    plan = resolve_plan("cpu", "float32", "float32")
    onednn, panel = linear_kernel(plan, "onednn"), linear_kernel(plan, "panel")
    if not isinstance(onednn, OneDnnLinear):
        sys.exit("this torch build has no working oneDNN linear")
    ups = [torch.randn(2 * INTERMEDIATE, HIDDEN) for _ in range(LAYERS)]
    downs = [torch.randn(HIDDEN, INTERMEDIATE) for _ in range(LAYERS)]
    layouts = {"oneDNN, plain weights": (onednn, ups, downs),
               "oneDNN, packed": (onednn, [onednn.pack(w) for w in ups], [onednn.pack(w) for w in downs])}
    if isinstance(panel, PanelLinear):
        layouts["kit's panel kernel"] = (panel, [panel.pack(w) for w in ups], [panel.pack(w) for w in downs])

    def mlps(x, kernel, up_weights, down_weights):
        for up, down in zip(up_weights, down_weights):
            kernel(kernel(x, up)[:, :INTERMEDIATE].contiguous(), down)

    print(f"{LAYERS} MLP layers ({2 * INTERMEDIATE}x{HIDDEN} and {HIDDEN}x{INTERMEDIATE}), "
          f"{torch.get_num_threads()} threads, best of {repeats} (ms)")
    for rows in row_counts:
        x = torch.randn(rows, HIDDEN)
        # One run of each layout in turn per repeat, so a change in the machine's speed hits all alike.
        best = dict.fromkeys(layouts, float("inf"))
        for _ in range(repeats):
            for name, layout in layouts.items():
                best[name] = min(best[name], best_ms(lambda: mlps(x, *layout), 1))
        print(f"rows {rows:4d}: " + ", ".join(f"{name} {ms:7.1f}" for name, ms in best.items()))


def bench_attention(repeats: int) -> None:
    """A decode step's attention for one layer, from the new token's q/k/v to the output, K/V store included."""
    native = Kernels.for_plan(resolve_plan("cpu", "float32", "float32")).decode_attention
    native = native if isinstance(native, NativeDecodeAttention) else None
    context = CpuDecodeAttention()  # its gather: the PyTorch paths' block gather
    print(f"decode attention, one layer, {HEADS}/{KV_HEADS} heads, contexts of 1-128 tokens in 128-slot blocks, "
          f"{torch.get_num_threads()} threads, best of {repeats} runs of 100 calls (us per call, store included)")
    for batch in (1, 2, 4, 16):
        k_cache, v_cache = (torch.randn(batch + 1, KV_HEADS, 128, HEAD_DIM) for _ in range(2))
        tables = torch.arange(1, batch + 1).view(batch, 1)
        lengths = torch.randint(1, 129, (batch,))
        mask = (torch.arange(128)[None, :] < lengths[:, None])[:, None, None, :]
        slots = torch.stack([tables[:, 0], lengths - 1])
        qkv = torch.randn(batch, HEADS + 2 * KV_HEADS, HEAD_DIM)
        q, k, v = qkv[:, :HEADS], qkv[:, HEADS:HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS:]

        def pytorch(attend):
            def run():
                for _ in range(100):
                    store_kv(k_cache, v_cache, k, v, slots)
                    attend(context.gather(k_cache, tables, "k"), context.gather(v_cache, tables, "v"))
            return run

        sdpa = pytorch(lambda kc, vc: F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, attn_mask=mask,
                                                                      scale=0.125, enable_gqa=True))
        grouped = pytorch(lambda kc, vc: grouped_decode_attention(q, kc, vc, mask, 0.125))
        line = (f"batch {batch:2d}: SDPA {best_ms(sdpa, repeats) * 10:6.1f}, grouped matmuls "
                f"{best_ms(grouped, repeats) * 10:6.1f}")
        if native is not None:
            def kit():
                for _ in range(100):
                    native.attend_paged(q, k, v, k_cache, v_cache, tables, lengths, 0.125)
            line += f", kit's native kernel {best_ms(kit, repeats) * 10:6.1f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("linear", "attention"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--rows", default="1,4,16,64,256", help="linear: row counts, comma-separated")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "linear":
        bench_linear(args.repeats, [int(r) for r in args.rows.split(",")])
    else:
        bench_attention(args.repeats)


if __name__ == "__main__":
    main()
