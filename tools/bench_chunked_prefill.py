"""Chunked prefill on the cpu-small checkpoint: how long a running answer stalls while a long prompt arrives,
chunked against unchunked in one process, alternating.

Each repeat starts request A (a short question, DECODE_TOKENS tokens, eos ignored) and, once A has produced its
first few tokens, adds request B (a long text prompt of about --prompt_tokens tokens). It records the gaps between
A's successive tokens and B's own time to its first token. Unchunked, B's whole prefill runs as one step and A's
longest gap is that step; chunked (--max_prefill_tokens per chunk), A decodes between B's chunks.

    python tools/bench_chunked_prefill.py [--prompt_tokens 3000] [--chunk 512] [--repeats 3]

Prints the medians over the repeats and `a_longest_gap_chunked_over_unchunked: X` and
`b_ttft_chunked_over_unchunked: X` at the end.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atb_models.cli.entry import FlagParser  # noqa: E402
from tools.ab_engines import alternate, cpu_small_engines  # noqa: E402

DECODE_TOKENS = 48
B_STARTS_AFTER = 4  # A's tokens before B arrives


def one_run(llm, long_text: str) -> dict:
    from atb_models import SamplingParams

    a = llm.add_request([{"text": "Describe a quiet harbour at dawn."}],
                        SamplingParams(max_tokens=DECODE_TOKENS, ignore_eos=True))
    a_times, b, b_added, b_first = [], None, None, None
    while llm.has_unfinished():
        for output in llm.step():
            now = time.perf_counter()
            if output.request_id == a:
                a_times.append(now)
            elif b_first is None:
                b_first = now
        if b is None and len(a_times) >= B_STARTS_AFTER:
            b = llm.add_request([{"text": long_text}], SamplingParams(max_tokens=2, ignore_eos=True))
            b_added = time.perf_counter()
    gaps = [later - earlier for earlier, later in zip(a_times, a_times[1:])]
    return {"a_longest_gap": max(gaps), "a_median_gap": statistics.median(gaps), "b_ttft": b_first - b_added}


def main() -> int:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt_tokens", type=int, default=3000, help="about how long B's prompt is")
    parser.add_argument("--chunk", type=int, default=512, help="--max_prefill_tokens of the chunked engine")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engines = cpu_small_engines(
        {"unchunked": {}, "chunked": dict(enable_chunked_prefill=True, max_prefill_tokens=args.chunk)},
        max_batch_size=2, max_input_length=args.prompt_tokens + 200, max_output_length=DECODE_TOKENS, block_size=128,
        enable_prefix_caching=False)
    words = ("harbour boats morning light water quiet gulls rope timber tide " * (args.prompt_tokens // 6)).split()
    tokenizer = engines["chunked"].tokenizer
    while len(tokenizer(" ".join(words))["input_ids"]) > args.prompt_tokens:
        words = words[:-10]
    long_text = " ".join(words)
    median = alternate(engines, lambda llm: one_run(llm, long_text), args.repeats)
    print(f"B's prompt: {len(tokenizer(long_text)['input_ids'])} text tokens (+ the chat template); chunk "
          f"{args.chunk}; A decodes {DECODE_TOKENS} tokens; medians of {args.repeats} repeats")
    for name, figures in median.items():
        print(f"{name:>10}: A's longest gap {figures['a_longest_gap'] * 1e3:8.1f} ms, A's median gap "
              f"{figures['a_median_gap'] * 1e3:6.1f} ms, B's time to first token {figures['b_ttft'] * 1e3:8.1f} ms")
    for key in ("a_longest_gap", "b_ttft"):
        print(f"{key}_chunked_over_unchunked: {median['chunked'][key] / median['unchunked'][key]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
