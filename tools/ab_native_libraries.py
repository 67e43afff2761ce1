"""The AVX2 library's kernels against the AVX-512 library's on one AVX-512 machine, in one process.

    python tools/ab_native_libraries.py --batch 16

Two engines of cpu-small's benchmark checkpoint (built if missing, or --checkpoint) in float32: one with the kernels
the machine chooses (the AVX-512 library), one made while torch's capability is reported as AVX2 (the library a CPU
without AVX-512 gets; PyTorch's own operators stay the machine's). Their generates alternate, the order flipping
each round, and the medians of each engine's decode steps and prefills are printed, with whether the tokens agree.
On a VM whose memory speed swings (docs/PERFORMANCE.md) this says what the narrower vectors cost where two compare
runs minutes apart cannot.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atb_models import LLM, SamplingParams  # noqa: E402
from atb_models.benchmark.presets import PRESETS, ensure_checkpoint  # noqa: E402
from atb_models.cli.entry import FlagParser  # noqa: E402


def main() -> None:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens a sequence")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--checkpoint", help="default: cpu-small's benchmark checkpoint (built if missing)")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(PRESETS["cpu-small"])
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        sys.exit("this compares both libraries, which needs an AVX-512 CPU")

    def engine() -> LLM:
        return LLM(str(checkpoint), dtype="float32", max_batch_size=args.batch, enable_prefix_caching=False)

    engines = {"avx512": engine()}
    machine = torch.backends.cpu.get_cpu_capability
    torch.backends.cpu.get_cpu_capability = lambda: "AVX2"
    try:
        engines["avx2"] = engine()
    finally:
        torch.backends.cpu.get_cpu_capability = machine
    for name, llm in engines.items():
        print(f"{name}: {llm.runner.kernels.describe()}")

    prompts = [[{"text": PRESETS["cpu-small"].workloads.decode_prompt}]] * args.batch
    params = [SamplingParams(max_tokens=args.tokens, ignore_eos=True)] * args.batch
    decode, prefill, tokens = ({name: [] for name in engines} for _ in range(3))
    for round_ in range(args.rounds):
        for name in (list(engines) if round_ % 2 == 0 else list(engines)[::-1]):
            llm = engines[name]
            outputs = llm.generate(prompts, params)
            decode[name].append(statistics.median(r.seconds for r in llm.step_records if not r.is_prefill))
            prefill[name].append(sum(r.seconds for r in llm.step_records if r.is_prefill))
            tokens[name] = [out.token_ids for out in outputs]
    for name in engines:
        print(f"{name}, batch {args.batch}: decode step median {statistics.median(decode[name]) * 1e3:.2f} ms, "
              f"prefill {statistics.median(prefill[name]) * 1e3:.1f} ms")
    ratio = [a / b for a, b in zip(decode["avx2"], decode["avx512"])]
    print(f"avx2 / avx512 decode step, median of rounds: {statistics.median(ratio):.3f}; "
          f"tokens {'identical' if tokens['avx2'] == tokens['avx512'] else 'DIFFER'}")


if __name__ == "__main__":
    main()
