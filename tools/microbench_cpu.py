"""Microbenchmarks behind the CPU optimisation steps of docs/PERFORMANCE.md, on cpu-small's shapes (float32).

    python tools/microbench_cpu.py linear      # 24 MLP layers: oneDNN (plain, packed) vs the kit's panel kernel
    python tools/microbench_cpu.py linear --dtype bfloat16   # the same on bf16 weights: widened, dot product
    python tools/microbench_cpu.py attention   # one layer's decode attention: SDPA, grouped matmuls, native
    python tools/microbench_cpu.py w8a16       # 24 layers' four linears: float32 panel kernel vs the int8 kernel

Each figure is the best of several timed runs after one untimed run (other load only slows a run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atb_models.benchmark.floors import best_seconds, measure_bandwidth  # noqa: E402
from atb_models.cli.entry import FlagParser  # noqa: E402
from atb_models.kernels import Kernels  # noqa: E402
from atb_models.kernels.attention import (CpuDecodeAttention, NativeDecodeAttention,  # noqa: E402
                                          grouped_decode_attention, store_kv)
from atb_models.kernels.linear import OneDnnLinear, PanelLinear, linear_kernel  # noqa: E402
from atb_models.kernels.native import NativeLibrary  # noqa: E402
from atb_models.kernels.w8a16 import NativeW8A16, quantize  # noqa: E402
from atb_models.platform import resolve_plan  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 896, 4864, 24  # Qwen2-0.5B's MLP
HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64
QKV = (HEADS + 2 * KV_HEADS) * HEAD_DIM


def best_ms(work, repeats: int) -> float:
    return best_seconds(work, lambda: None, repeats) * 1000


def bench_linear(repeats: int, row_counts: list, dtype: torch.dtype) -> None:
    """float32: oneDNN (plain, packed) against the kit's float32 panels. bfloat16 weights: oneDNN's bfloat16 linear
    against the kit's bf16 panels with float32 inputs (a float32 model of a bf16 checkpoint: widened, as chosen)
    and with bfloat16 inputs (a bfloat16 model: AVX512-BF16's dot product where the kit chose it). At one row,
    also the weights' bytes over the time against the read probe (a float32 sum of 1 GiB) of the same repeat."""
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    plan = resolve_plan("cpu", name, name)
    onednn, panel = linear_kernel(plan, "onednn"), linear_kernel(plan, "panel")
    if not isinstance(onednn, OneDnnLinear):
        sys.exit("this torch build has no working oneDNN linear")
    ups = [torch.randn(2 * INTERMEDIATE, HIDDEN).to(dtype) for _ in range(LAYERS)]
    downs = [torch.randn(HIDDEN, INTERMEDIATE).to(dtype) for _ in range(LAYERS)]
    layouts = {"oneDNN, plain weights": (onednn, ups, downs, dtype)}
    try:
        layouts["oneDNN, packed"] = (onednn, [onednn.pack(w) for w in ups], [onednn.pack(w) for w in downs], dtype)
    except RuntimeError as error:  # (oneDNN packs bfloat16 only where the CPU has AVX-512 or AVX-NE-CONVERT)
        print(f"oneDNN, packed: left out, it does not pack {dtype} weights here ({str(error).splitlines()[0]})")
    if isinstance(panel, PanelLinear):
        panels = (panel, [panel.pack(w) for w in ups], [panel.pack(w) for w in downs])
        if dtype == torch.float32:
            layouts["kit's panel kernel"] = (*panels, dtype)
        else:
            layouts["kit, float32 inputs (widened)"] = (*panels, torch.float32)
            layouts[f"kit, bf16 inputs ({bf16_inputs_way()})"] = (*panels, dtype)

    def mlps(x, kernel, up_weights, down_weights, _):
        for up, down in zip(up_weights, down_weights):
            kernel(kernel(x, up)[:, :INTERMEDIATE].contiguous(), down)

    for name, (kernel, up_weights, _, x_dtype) in list(layouts.items()):
        try:  # (oneDNN at a narrower ISA than bfloat16 needs, emulating an older CPU, refuses the product)
            kernel(torch.ones(1, HIDDEN, dtype=x_dtype), up_weights[0])
        except RuntimeError as error:
            print(f"{name}: left out, it does not run here ({str(error).splitlines()[0]})")
            del layouts[name]
    if not layouts:
        sys.exit(f"nothing to time on {dtype} weights here (the kit's bfloat16 kernels need AVX-512)")

    print(f"{LAYERS} MLP layers ({2 * INTERMEDIATE}x{HIDDEN} and {HIDDEN}x{INTERMEDIATE}), {dtype} weights, "
          f"{torch.get_num_threads()} threads, best of {repeats} (ms; GFLOP/s)")
    for rows in row_counts:
        flops = 2 * rows * LAYERS * 3 * INTERMEDIATE * HIDDEN
        x = torch.randn(rows, HIDDEN).to(dtype)
        # One run of each layout in turn per repeat, so a change in the machine's speed hits all alike.
        best = dict.fromkeys(layouts, float("inf"))
        probe = 0.0
        for _ in range(repeats):
            if rows == 1:
                probe = max(probe, measure_bandwidth(torch.device("cpu"), 1 << 30, lambda: None, repeats=1))
            for name, layout in layouts.items():
                best[name] = min(best[name], best_ms(lambda: mlps(x.to(layout[3]), *layout), 1))
        print(f"rows {rows:4d}: " + ", ".join(f"{name} {ms:7.1f} ({flops / ms / 1e6:.0f})"
                                             for name, ms in best.items()))
        if rows == 1:
            print(f"  one row, GB/s of weights read: " + ", ".join(
                f"{name} {sum(w.numel() * w.element_size() for w in layout[1] + layout[2]) / ms / 1e6:.1f}"
                for (name, layout), ms in zip(layouts.items(), best.values())) + f" (probe {probe / 1e9:.1f})")


def bf16_inputs_way() -> str:
    """How the kit multiplies bfloat16 inputs here, as the library's switches say (set by the kernels' load)."""
    library = NativeLibrary.load()
    if library is None or not library.atb_bf16_dot_available():
        return "widened"
    if library.atb_bf16_use_amx(-1):
        return "AMX tiles"
    batched = "dot product" if library.atb_bf16_use_dot(-1) else "widened"
    return f"batched rows {batched}, up to {library.atb_bf16_dot_decode_rows(-1)} rows by the dot product"


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


def bench_w8a16(repeats: int, row_counts: list) -> None:
    """A decode step's linears (qkv, o, gate_up, down of 24 layers: more than the last-level cache holds) in
    float32 through the panel kernel and in int8 through the W8A16 kernel (per channel and per group of 128),
    interleaved; the weight bytes each reads over its time, against the machine's read bandwidth."""
    kernels = Kernels.for_plan(resolve_plan("cpu", "float32", "float32"))
    panel, w8a16 = kernels.linear, kernels.w8a16
    if not isinstance(panel, PanelLinear) or not isinstance(w8a16, NativeW8A16):
        sys.exit("the kit's native kernels do not run here (AVX-512 and g++ needed)")
    shapes = ((QKV, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE))
    float_layers, int8_layers = {"float32": []}, {"int8 per channel": [], "int8 group 128": []}
    for _ in range(LAYERS):
        weights = [torch.randn(shape) for shape in shapes]
        float_layers["float32"].append([panel.pack(w) for w in weights])
        for name, group_size in zip(int8_layers, (None, 128)):
            int8_layers[name].append([(w8a16.pack(q, s), s) for q, s in (quantize(w, group_size) for w in weights)])
    weight_bytes = {name: sum(t.numel() * t.element_size() for layer in layers for w in layer
                              for t in (w if isinstance(w, tuple) else (w,)))
                    for name, layers in {**float_layers, **int8_layers}.items()}

    def run_float(x, layers):
        for layer in layers:
            for w in layer:
                panel(x[:, :w.shape[1]], w)

    def run_int8(x, layers):
        for layer in layers:
            for w, s in layer:
                in_features = 4 * w.shape[2] if w.dim() == 5 else 2 * w.shape[1]  # (tile_layout, pair_layout)
                w8a16(x[:, :in_features], w, None, s)

    bandwidth = measure_bandwidth(torch.device("cpu"), 1 << 30, lambda: None)
    print(f"{LAYERS} layers' qkv, o, gate_up, down, {torch.get_num_threads()} threads, {repeats} interleaved runs; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s (data.sum() of 1 GiB) before")
    for rows in row_counts:
        x = torch.randn(rows, INTERMEDIATE)
        runs = {name: (run_float, layers) for name, layers in float_layers.items()}
        runs.update({name: (run_int8, layers) for name, layers in int8_layers.items()})
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, (run, layers) in runs.items():
                times[name].append(best_ms(lambda: run(x, layers), 1))
        line = []
        for name, ms in times.items():
            best, median = min(ms), sorted(ms)[len(ms) // 2]
            line.append(f"{name} {best:6.1f} / {median:6.1f} ms ({weight_bytes[name] / best / 1e6:5.1f} GB/s best)")
        print(f"rows {rows:3d}: " + ", ".join(line))
    after = measure_bandwidth(torch.device("cpu"), 1 << 30, lambda: None)
    print(f"read bandwidth after: {after / 1e9:.1f} GB/s; int8 floor at the better reading "
          f"{weight_bytes['int8 per channel'] / max(bandwidth, after) * 1e3:.1f} ms (per channel)")


def main() -> None:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("linear", "attention", "w8a16"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--rows", help="linear, w8a16: row counts, comma-separated (default 1,4,16,64,256 and 1,16)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="linear: the weights'")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "linear":
        bench_linear(args.repeats, [int(r) for r in (args.rows or "1,4,16,64,256").split(",")],
                     getattr(torch, args.dtype))
    elif args.what == "w8a16":
        bench_w8a16(args.repeats, [int(r) for r in (args.rows or "1,16").split(",")])
    else:
        bench_attention(args.repeats)


if __name__ == "__main__":
    main()
