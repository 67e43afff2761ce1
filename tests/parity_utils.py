"""Helpers the tests share: the reference side of parity tests (transformers' Qwen2VLForConditionalGeneration on
the kit's own inputs), a recorder of the kit's logits, and a free port for a launcher's master.

transformers' modeling code is imported only when a reference model is loaded: tests/tp_worker.py, started once
per rank, uses the recorder alone.
"""
import functools
import json
import socket

import torch

from atb_models.benchmark.engines import reference_inputs


@functools.lru_cache(maxsize=8)
def reference_model(path: str, dtype: torch.dtype = torch.float32):
    """transformers' Qwen2VLForConditionalGeneration for the checkpoint at path, in `dtype`, loaded once."""
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(path, torch_dtype=dtype).eval()


def reference_generate(path, prompt, max_new_tokens: int, dtype: torch.dtype = torch.float32):
    """Greedy tokens and per-step logits (as float32) from transformers in `dtype` for one preprocessed prompt."""
    model = reference_model(str(path), dtype)
    inputs = reference_inputs([prompt], pad_token_id=0, device=torch.device("cpu"))  # one prompt: no padding
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=None)
    return out.sequences[0, len(prompt.token_ids):].tolist(), [s[0].float() for s in out.scores]


def reference_prompt_logits(path, prompt) -> torch.Tensor:
    """transformers' float32 logits [prompt tokens, vocab] after each token of one preprocessed prompt."""
    model = reference_model(str(path))
    inputs = reference_inputs([prompt], pad_token_id=0, device=torch.device("cpu"))
    # (transformers' forward leaves the M-RoPE positions to generate(): given here as generate computes them)
    positions, _ = model.get_rope_index(inputs["input_ids"], inputs.get("image_grid_thw"),
                                        inputs.get("video_grid_thw"), inputs["attention_mask"])
    with torch.no_grad():
        return model(**inputs, position_ids=positions).logits[0].float()


@functools.lru_cache(maxsize=4)
def kit_preprocessor(path: str):
    """The kit's preprocessor for the checkpoint at path, as a float32 CPU LLM builds it (the LLM is not kept)."""
    from atb_models import LLM

    return LLM(path, dtype="float32", device="cpu", max_input_length=1024, max_output_length=16,
               max_batch_size=1).preprocessor


def reference_for_request(path, request: list, max_new_tokens: int) -> tuple[list, torch.Tensor]:
    """transformers' greedy tokens and stacked per-step logits for one request in the kit's format, preprocessed by
    the kit. Computed once per request: tests at several world sizes compare against the same reference."""
    return _reference_for_request(str(path), json.dumps(request), max_new_tokens)


@functools.lru_cache(maxsize=None)
def _reference_for_request(path: str, request_json: str, max_new_tokens: int) -> tuple[list, torch.Tensor]:
    tokens, logits = reference_generate(path, kit_preprocessor(path)(json.loads(request_json)), max_new_tokens)
    return tokens, torch.stack(logits)


class LogitsRecorder:
    """Wraps an LLM's model runner to keep the logits row of every sequence at every step that draws its token
    (`by_seq[seq_id]`): a chunk of a prompt that leaves part of it for later draws none."""

    def __init__(self, llm):
        self.by_seq = {}
        run = llm.runner.run

        def recording_run(seqs, is_prefill):
            logits = run(seqs, is_prefill)
            for seq, row in zip(seqs, logits):
                if not (is_prefill and seq.prefill_end < seq.num_tokens):
                    self.by_seq.setdefault(seq.seq_id, []).append(row.clone())
            return logits

        llm.runner.run = recording_run


def free_port() -> int:
    """A TCP port that nothing listens on now, on any interface (what the launcher checks a master port for)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
