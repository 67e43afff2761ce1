"""Microbenchmarks behind the CPU optimisation steps of docs/PERFORMANCE.md, on cpu-small's shapes (float32).

    python tools/microbench_cpu.py linear      # 24 MLP layers: oneDNN (plain, packed) vs the kit's panel kernel
    python tools/microbench_cpu.py attention   # one layer's decode attention: SDPA vs the kit's grouped matmuls

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
from atb_models.layers.attention import _grouped_decode_attention  # noqa: E402
from atb_models.platform import OneDnnLinear, PanelLinear, linear_kernel, resolve_plan  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 896, 4864, 24  # Qwen2-0.5B's MLP
HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64


def best_ms(work, repeats: int) -> float:
    return best_seconds(work, lambda: None, repeats) * 1000


def bench_linear(repeats: int) -> None:
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
    for rows in (1, 4, 16, 64, 256):
        x = torch.randn(rows, HIDDEN)
        # One run of each layout in turn per repeat, so a change in the machine's speed hits all alike.
        best = dict.fromkeys(layouts, float("inf"))
        for _ in range(repeats):
            for name, layout in layouts.items():
                best[name] = min(best[name], best_ms(lambda: mlps(x, *layout), 1))
        print(f"rows {rows:4d}: " + ", ".join(f"{name} {ms:7.1f}" for name, ms in best.items()))


def bench_attention(repeats: int) -> None:
    print(f"decode attention, one layer, {HEADS}/{KV_HEADS} heads, 128 slots, {torch.get_num_threads()} threads, "
          f"best of {repeats} runs of 100 calls (us per call)")
    for batch in (1, 2, 4, 16):
        q = torch.randn(batch, HEADS, HEAD_DIM)
        kc, vc = torch.randn(batch, KV_HEADS, 128, HEAD_DIM), torch.randn(batch, KV_HEADS, 128, HEAD_DIM)
        mask = (torch.arange(128)[None, :] < torch.randint(1, 128, (batch,))[:, None])[:, None, None, :]

        def sdpa():
            for _ in range(100):
                F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, attn_mask=mask, scale=0.125, enable_gqa=True)

        def grouped():
            for _ in range(100):
                _grouped_decode_attention(q, kc, vc, mask, 0.125)

        print(f"batch {batch:2d}: SDPA {best_ms(sdpa, repeats) * 10:6.1f}, grouped matmuls "
              f"{best_ms(grouped, repeats) * 10:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("linear", "attention"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (bench_linear if args.what == "linear" else bench_attention)(args.repeats)


if __name__ == "__main__":
    main()
