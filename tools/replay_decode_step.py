"""A/B of the kit's native kernels on one real decode step: the working tree's library against the csrc of another
git revision, on this machine in one process (the library the model runs on, the AVX-512 one or on a CPU without
AVX-512 the AVX2 one, against the same library of the other revision).

    python tools/replay_decode_step.py --against HEAD~1 --dtype bfloat16 --batch 16
    python tools/replay_decode_step.py --against HEAD~1 --quantize w8a16 --batch 16

The memory speed of the VMs these kernels were tuned on swings by half within a second (docs/PERFORMANCE.md), so
two runs minutes apart say little about a change of 5-10%. This loads cpu-small's benchmark checkpoint (or
--checkpoint), runs one short generate at the batch size, keeps the 24 native decoder-layer calls of its last decode
step, then replays that step through both libraries in turn (the order flipping every pair, the residual stream
restored before each) and prints the median time of each and the median ratio of the pairs. The other revision's
kernels read this tree's packed weights: where the layouts differ its outputs do (the line "same outputs" says so),
but its memory access pattern is the one it would have.
"""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atb_models import LLM, SamplingParams  # noqa: E402
from atb_models.benchmark.presets import PRESETS, ensure_checkpoint  # noqa: E402
from atb_models.cli.entry import FlagParser  # noqa: E402
from atb_models.kernels import native  # noqa: E402
from atb_models.kernels.decoder_layer import LayerByLayer, NativeDecoderLayer  # noqa: E402


def build_revision(revision: str, into: Path, avx2: bool):
    """The decoder-layer function of the library built from `revision`'s atb_models/csrc (its AVX2 library where
    `avx2`: the one this tree's model runs on a CPU without AVX-512), and its library."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "atb_models/csrc"], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"git archive {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    name, flags = (native.AVX2_LIBRARY, native.AVX2_CXX_FLAGS) if avx2 else (native.LIBRARY, native.compile_flags())
    source, target = into / f"atb_models/csrc/{name}.cpp", into / f"{name}.so"
    if not source.is_file():
        sys.exit(f"{revision} has no atb_models/csrc/{name}.cpp")
    built = subprocess.run([native.compiler(), *flags, str(source), "-o", str(target)], capture_output=True, text=True)
    if built.returncode != 0:
        sys.exit(f"building {revision}'s kernels failed: {built.stderr.strip().splitlines()[-1]}")
    library = ctypes.CDLL(str(target))
    layer = getattr(library, "atb_decoder_layer_decode_f32", None)
    if layer is None:
        sys.exit(f"{revision}'s {name} has no decoder layer to compare")
    layer.argtypes, layer.restype = [ctypes.c_void_p] * 3, None
    return layer, library


def abi_version(library) -> int:
    """The ABI version a library reports (atb_native_abi's "version=V ...")."""
    library.atb_native_abi.restype = ctypes.c_char_p
    return int(library.atb_native_abi().decode().split()[0].removeprefix("version="))


def main() -> None:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD", help="git revision whose csrc to compare (default HEAD)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--quantize", choices=("w8a16",), help="the language model's linears quantized at load (int8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=150)
    parser.add_argument("--checkpoint", help="default: cpu-small's benchmark checkpoint (built if missing)")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(PRESETS["cpu-small"])

    with tempfile.TemporaryDirectory(prefix="atb-replay-") as scratch:
        llm = LLM(str(checkpoint), dtype=args.dtype, max_batch_size=args.batch, enable_prefix_caching=False,
                  quantize=args.quantize)
        kernel = llm.runner.model.kernels.decoder_layer
        if not isinstance(kernel, NativeDecoderLayer):
            sys.exit("this machine runs the layers operator by operator: no native decoder layer to compare")
        avx2 = kernel.name.endswith("(AVX2)")
        other, library = build_revision(args.against, Path(scratch), avx2)
        calls, own = [], kernel._op

        def capture(weights, decode_step, x: int) -> None:
            # The structs (they keep their step's tensors alive) and the residual stream's bytes as the layer got
            # them: the stream itself is the forward's, freed after it.
            width = 2 if decode_step.x_format == native.FORMATS[torch.bfloat16] else 4
            size = decode_step.rows * weights.hidden * width
            calls.append((weights, decode_step, ctypes.string_at(x, size)))
            own(weights, decode_step, x)

        # The layers one call each (the model runs them in one), each call captured.
        kernel._op, kernel.run_layers = capture, types.MethodType(LayerByLayer.run_layers, kernel)
        prompt = [{"text": PRESETS["cpu-small"].workloads.decode_prompt}]
        llm.generate([prompt] * args.batch, [SamplingParams(max_tokens=3, ignore_eos=True)] * args.batch)
        kernel._op = own
        del kernel.run_layers
        step = calls[-len(llm.runner.model.model.layers):]
        formats = {getattr(w, f"{name}_format") for w, _, _ in step for name in ("qkv", "o", "gate_up", "down")}
        if native.INT8_TILES_FORMAT in formats and abi_version(library) < 14:
            sys.exit(f"{args.against}'s library predates int8 weights in the AMX tiles' layout, which this tree's "
                     "model has: run with ATB_MODELS_CPU_BF16_AMX=0 (int8 in pairs, as both libraries read them)")
        start = step[0][2]
        x_bytes = len(start)
        stream = ctypes.create_string_buffer(x_bytes)  # the residual stream of the replays
        x = ctypes.addressof(stream)

        if not avx2:  # (the AVX2 library has no switches)
            # The library's switches (the dot product, the AMX tiles, the stream prefetches, the bfloat16 widening,
            # decode's dot product) as this tree's library chose them, where the other library can choose: a switch
            # left at its default would compare the two choices, not the code.
            ours = native.NativeLibrary.load()
            for switch in ("atb_bf16_use_dot", "atb_bf16_use_amx", "atb_f32_use_amx", "atb_use_stream_prefetch",
                           "atb_bf16_widen_in_registers", "atb_bf16_dot_decode_rows",
                           "atb_bf16_dot_one_pass_prefetch"):
                if hasattr(library, switch):
                    getattr(library, switch).argtypes = [ctypes.c_int64]
                    getattr(library, switch).restype = ctypes.c_int64
                    getattr(library, switch)(getattr(ours, switch)(-1))
        sides = {"working tree": own, args.against: other}

        def replay(op) -> float:
            ctypes.memmove(x, start, x_bytes)
            began = time.perf_counter()
            for layer_weights, layer_step, _ in step:
                op(ctypes.byref(layer_weights), ctypes.byref(layer_step), x)
            return time.perf_counter() - began

        outputs = {}
        for name, op in sides.items():
            replay(op)
            outputs[name] = stream.raw
        print(f"same outputs: {outputs['working tree'] == outputs[args.against]}")
        times = {name: [] for name in sides}
        for pair in range(args.pairs):
            for name in (list(sides) if pair % 2 == 0 else list(sides)[::-1]):
                times[name].append(replay(sides[name]))
        ratios = [ours / theirs for ours, theirs in zip(times["working tree"], times[args.against])]
        print(f"{args.dtype}{', ' + args.quantize if args.quantize else ''}, batch {args.batch}, {len(step)} layers, "
              f"{args.pairs} pairs: "
              + ", ".join(f"{name} median {statistics.median(t) * 1e3:.2f} ms" for name, t in times.items())
              + f"; working tree / {args.against}: median of pairs {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
