"""Beam search on the cpu-small checkpoint: the kit's LLM.beam_search against transformers' generate(num_beams=...)
on the same prompt, and the kit's beam step against its own decode step of as many greedy sequences, in one process.

A text prompt (transformers 4.46 garbles an image for its beams: tests/test_beam_search.py), eos ignored so that
every run generates `--tokens`, float32 on the CPU. Both sides run `--repeats` times after a warm-up, in turn.

    python tools/bench_beam_search.py [--width 4] [--tokens 32] [--repeats 3]

Prints the medians and at the end `beam_speedup_vs_hf: X` (transformers' seconds over the kit's) and
`beam_step_over_greedy_batch_step: X` (the kit's mean decode step in a beam search over its mean decode step of
`--width` greedy copies of the prompt: what sharing the beams' KV blocks and copying the one they write apart cost).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atb_models.cli.entry import FlagParser  # noqa: E402
from tools.ab_engines import cpu_small_engines  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> int:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4, help="beams")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from atb_models import BeamSearchParams, SamplingParams
    from atb_models.benchmark.engines import reference_inputs

    llm = cpu_small_engines({"kit": {}}, max_batch_size=args.width, max_input_length=512,
                            max_output_length=args.tokens, block_size=128, enable_prefix_caching=False)["kit"]
    reference = Qwen2VLForConditionalGeneration.from_pretrained(llm.model_config.path,
                                                                torch_dtype=torch.float32,
                                                                trust_remote_code=False).eval()
    request = [{"text": PROMPT}]
    inputs = reference_inputs([llm.preprocessor(request)], pad_token_id=0, device=torch.device("cpu"))
    beams = BeamSearchParams(beam_width=args.width, max_tokens=args.tokens, ignore_eos=True)

    def kit_beams() -> dict:
        start = time.perf_counter()
        llm.beam_search([request], beams)
        seconds = time.perf_counter() - start
        decode = [r.seconds for r in llm.step_records if not r.is_prefill]
        return {"seconds": seconds, "step_ms": 1e3 * statistics.mean(decode)}

    def kit_greedy_batch() -> dict:
        llm.generate([request] * args.width, SamplingParams(max_tokens=args.tokens, ignore_eos=True))
        decode = [r.seconds for r in llm.step_records if not r.is_prefill]
        return {"step_ms": 1e3 * statistics.mean(decode)}

    def transformers_beams() -> dict:
        start = time.perf_counter()
        with torch.no_grad():
            reference.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                               num_beams=args.width, eos_token_id=None, pad_token_id=0)
        return {"seconds": time.perf_counter() - start}

    runs = {"kit beam search": kit_beams, "kit greedy batch": kit_greedy_batch, "transformers": transformers_beams}
    for run in runs.values():
        run()  # warm-up
    results = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name in list(runs) if repeat % 2 == 0 else list(reversed(runs)):
            results[name].append(runs[name]())
    median = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in results.items()}
    print(f"beam width {args.width}, {args.tokens} tokens, text prompt of "
          f"{len(inputs['input_ids'][0])} tokens; medians of {args.repeats} repeats")
    print(f"  kit beam search: {median['kit beam search']['seconds']:.3f} s, "
          f"{median['kit beam search']['step_ms']:.1f} ms a decode step")
    print(f"  kit, {args.width} greedy copies: {median['kit greedy batch']['step_ms']:.1f} ms a decode step")
    print(f"  transformers num_beams={args.width}: {median['transformers']['seconds']:.3f} s")
    print(f"beam_speedup_vs_hf: {median['transformers']['seconds'] / median['kit beam search']['seconds']:.2f}")
    print(f"beam_step_over_greedy_batch_step: "
          f"{median['kit beam search']['step_ms'] / median['kit greedy batch']['step_ms']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
