"""Speculative decoding by prompt lookup on the cpu-small checkpoint: decode time per generated token with and
without `--num_speculative_tokens`, in one process, alternating, and what a drafted step costs against a plain one.

Greedy requests, eos ignored, one at a time by default (batch 1, where a decode step waits on the weights alone)
or `--batch` copies at once. The guesses
hold as often as the answer repeats what came before it: the figures are this checkpoint's (random weights) on this
prompt, and an answer that never repeats gains nothing while its steps cost what plain ones do.

    python tools/bench_speculative.py [--tokens 96] [--k 4] [--repeats 3] [--batch 1]

Prints per engine the median decode ms per token and per step, the guesses accepted, and at the end
`decode_ms_per_token_speculative_over_plain: X` and `step_ms_speculative_over_plain: X`.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atb_models.cli.entry import FlagParser  # noqa: E402
from tools.ab_engines import alternate, cpu_small_engines  # noqa: E402

PROMPT = ("Copy this list exactly, then continue it: apples, pears, plums, apples, pears, plums, apples, pears, "
          "plums, apples, pears, plums.")


def one_run(llm, tokens: int, batch: int) -> dict:
    from atb_models import SamplingParams

    before = (llm.speculative_stats.proposed, llm.speculative_stats.accepted)
    llm.generate([[{"text": PROMPT}]] * batch, SamplingParams(max_tokens=tokens, ignore_eos=True))
    decode = [r for r in llm.step_records if not r.is_prefill]
    seconds = sum(r.seconds for r in decode)
    generated = tokens - 1  # a request's tokens after its first (the prefill, one step for the batch, drew that)
    return {"ms_per_token": seconds / generated * 1e3, "ms_per_step": seconds / len(decode) * 1e3,
            "steps": len(decode), "proposed": llm.speculative_stats.proposed - before[0],
            "accepted": llm.speculative_stats.accepted - before[1]}


def main() -> int:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=96, help="tokens generated per run")
    parser.add_argument("--k", type=int, default=4, help="--num_speculative_tokens of the drafting engine")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="copies of the request run at once")
    args = parser.parse_args()
    engines = cpu_small_engines({"plain": {}, "speculative": dict(num_speculative_tokens=args.k)},
                                max_batch_size=args.batch, max_input_length=512, max_output_length=args.tokens,
                                block_size=128, enable_prefix_caching=False)
    median = alternate(engines, lambda llm: one_run(llm, args.tokens, args.batch), args.repeats)
    print(f"{args.tokens} tokens a request, batch {args.batch}, k {args.k}; medians of {args.repeats} repeats")
    for name, figures in median.items():
        print(f"{name:>12}: {figures['ms_per_token']:7.1f} ms a token, {figures['ms_per_step']:7.1f} ms a step, "
              f"{figures['steps']:.0f} decode steps, guesses {figures['accepted']:.0f} held of "
              f"{figures['proposed']:.0f}")
    print(f"decode_ms_per_token_speculative_over_plain: "
          f"{median['speculative']['ms_per_token'] / median['plain']['ms_per_token']:.3f}")
    print(f"step_ms_speculative_over_plain: "
          f"{median['speculative']['ms_per_step'] / median['plain']['ms_per_step']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
