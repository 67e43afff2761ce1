"""One rank of a tensor-parallel test run, started by torchrun from tests/test_tensor_parallel.py.

argv[1]: a JSON job {model, requests, max_tokens, sampling, out}. Rank 0 writes the outputs and every step's
logits; every rank writes what it read of the checkpoint. With "beam_search" (BeamSearchParams' fields) every rank
writes its beam search's answers instead.
"""
import json
import os
import signal
import sys

import torch

from atb_models import LLM, SamplingParams, UserError
from atb_models.errors import RankLost
from atb_models.launch import report_rank_failure
from atb_models.weights import CheckpointTensor
from tests.parity_utils import LogitsRecorder


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    llm = LLM(job["model"], dtype="float32", device="cpu", max_batch_size=job.get("max_batch_size", 4),
              max_input_length=1024, max_output_length=16, block_size=16,
              shm_name_save_path=os.path.join(job["out"], "shm_names.txt"), quantize=job.get("quantize"),
              **job.get("engine", {}))
    if job.get("fail_rank") == rank:
        if job.get("fail_how") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise UserError("injected failure for the test")
    preprocessed = []
    preprocess = llm.node_preprocessor.preprocessor

    def counting_preprocess(request):
        preprocessed.append(1)
        return preprocess(request)

    llm.node_preprocessor.preprocessor = counting_preprocess
    recorder = LogitsRecorder(llm)
    sampling = dict(job.get("sampling", {}))
    if "structured_output" in sampling:
        from atb_models.engine.structured_output import StructuredOutput

        sampling["structured_output"] = StructuredOutput(**sampling["structured_output"])
    out = job["out"]
    if "beam_search" in job:  # each answer's token ids and score, best first
        from atb_models import BeamSearchParams

        beams = llm.beam_search(job["requests"], BeamSearchParams(**job["beam_search"]))
        with open(os.path.join(out, f"beams_rank{rank}.json"), "w") as f:
            json.dump([[[s.token_ids, s.score] for s in o.sequences] for o in beams], f)
        return
    params = SamplingParams(max_tokens=job["max_tokens"], ignore_eos=True, **sampling)
    outputs = llm.generate(job["requests"], params)
    with open(os.path.join(out, f"read_rank{rank}.json"), "w") as f:
        json.dump(CheckpointTensor.bytes_read, f)
    with open(os.path.join(out, f"tokens_rank{rank}.json"), "w") as f:
        json.dump([o.token_ids for o in outputs], f)
    with open(os.path.join(out, f"preprocessed_rank{rank}.json"), "w") as f:
        json.dump(len(preprocessed), f)
    with open(os.path.join(out, f"speculative_rank{rank}.json"), "w") as f:
        json.dump([llm.speculative_stats.proposed, llm.speculative_stats.accepted], f)
    if rank == 0:
        torch.save({i: torch.stack(rows) for i, rows in recorder.by_seq.items()}, os.path.join(out, "logits.pt"))
        with open(os.path.join(out, "outputs.json"), "w") as f:
            json.dump([{"token_ids": o.token_ids, "error": o.error, "cached_prompt_tokens": o.cached_prompt_tokens,
                        "text": o.text, "finish_reason": o.finish_reason,
                        "prompt_logprobs": o.prompt_logprobs and [None] + [
                            [e.token_id, e.logprob, e.top] for e in o.prompt_logprobs[1:]]} for o in outputs], f)


if __name__ == "__main__":
    try:
        main()
    except (UserError, RankLost) as e:
        if not report_rank_failure(str(e)):
            print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
