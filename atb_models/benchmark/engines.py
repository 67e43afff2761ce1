"""The two sides of `compare`, timed the same way: the kit's engine and transformers' implementation of the
checkpoint's family (the registry's reference class, atb_models.models) on the kit's own preprocessed prompts.

Every timing is wall clock from the moment the requests are handed over, so both sides include preprocessing
(image decoding, resizing, normalising, the chat template: the same code for both), and every host cost between
tokens. Outputs always reach their requested length: the kit ignores eos, transformers is given no eos id.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from atb_models import LLM, SamplingParams
from atb_models.errors import UserError
from atb_models.host import settle_vector_math

logger = logging.getLogger("atb_models.benchmark")


@dataclass
class Request:
    items: list          # the kit's request format: [{"image": path}, {"text": ...}]
    max_tokens: int


@dataclass
class Timing:
    seconds: float                  # until the last token of the last request
    first_token: float              # until the first request's first token
    per_token: float                # the first request's decode steps: (last token - first token) / (tokens - 1)
    token_ids: list                 # per request
    in_step: Optional[float] = None  # kit only: mean decode step from forward to sampled token (StepRecord)


def _per_token(first: float, last: float, num_tokens: int) -> float:
    return (last - first) / (num_tokens - 1) if num_tokens > 1 else 0.0


class KitEngine:
    def __init__(self, llm: LLM):
        self.llm = llm
        self.plan = llm.plan

    def run(self, requests: list[Request]) -> Timing:
        params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
        start = time.perf_counter()
        outputs = self.llm.generate([r.items for r in requests], params)
        seconds = time.perf_counter() - start
        failed = [out.error for out in outputs if out.error is not None]
        if failed:
            raise UserError(f"the kit failed a benchmark request: {failed[0]}")
        first = outputs[0]
        decode_steps = [r.seconds for r in self.llm.step_records if not r.is_prefill]
        return Timing(seconds, first.first_token_s,
                      _per_token(first.first_token_s, first.finished_s, len(first.token_ids)),
                      [out.token_ids for out in outputs],
                      sum(decode_steps) / len(decode_steps) if decode_steps else None)


    def teacher_forced_argmax(self, items: list, tokens: list) -> list:
        """The engine's greedy choice at each position of `tokens` given the prompt and the tokens before it (one
        prefill over all of them): where it agrees with `tokens`, this engine would have decoded them too."""
        logits = self.llm.teacher_forced_logits(items, tokens)
        return logits.argmax(dim=-1).tolist()


class _TokenClock:
    """A stopping criterion that never stops: it notes when each generated token is ready (device synchronised)."""

    def __init__(self, synchronize):
        self.synchronize = synchronize
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def load_reference_model(model_config, plan):
    """transformers' implementation of a checkpoint's family (`model_config.family.reference_class()`), read from
    its safetensors as the kit reads them, computing as `plan` says (language model in plan.llm_dtype, vision tower
    in plan.vision_dtype, on plan.device); a folder it cannot load is one UserError."""
    reference_class = model_config.family.reference_class()
    settle_vector_math()
    try:
        # Safetensors only: a pickled checkpoint (pytorch_model.bin) is not loaded; code in the folder never runs.
        model = reference_class.from_pretrained(model_config.path, torch_dtype=plan.llm_dtype, use_safetensors=True,
                                                trust_remote_code=False)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())
        raise UserError(f"cannot load the model from {model_config.path}: {reason}") from None
    model.visual.to(plan.vision_dtype)
    return model.to(plan.device).eval()


class LocalReference:
    """transformers' model in this process (the kit's pinned release has the family's class)."""

    def __init__(self, model_config, plan):
        self.model = load_reference_model(model_config, plan)
        generation = self.model.generation_config
        self.pad_token_id, self.eos_token_id = generation.pad_token_id, generation.eos_token_id
        self.language_model_sizes = [(name, p.numel()) for name, p in self.model.model.named_parameters()]
        self.lm_head_size = self.model.lm_head.weight.numel()
        self.description = f"transformers {type(self.model).__name__}"

    def generate(self, inputs: dict, clock=None, **kwargs) -> torch.Tensor:
        """model.generate(**inputs, **kwargs); `clock` (a _TokenClock) notes when each token is ready."""
        with torch.inference_mode():
            return self.model.generate(**inputs, **kwargs, stopping_criteria=[clock] if clock is not None else None)

    def close(self) -> None:
        pass


def open_reference(model_config, plan):
    """transformers' implementation of the checkpoint's family: in this process where the kit's pinned release has
    it, else in a worker process of the reference venv (transformers 4.51.3, made on first use: atb_models.oracle),
    as Qwen2.5-VL needs. Both answer `generate(inputs, clock, **kwargs)` alike."""
    try:
        model_config.family.reference_class()
    except UserError:
        from atb_models.oracle import RemoteReference

        class_name = model_config.family.reference.partition(":")[2]
        logger.info("transformers here has no %s: the reference runs in the venv of atb_models.oracle", class_name)
        return RemoteReference(model_config.path, plan.llm_dtype, plan.vision_dtype, plan.device, class_name)
    return LocalReference(model_config, plan)


def reference_inputs(prompts: list, pad_token_id: int, device: torch.device, video_seconds: bool = False) -> dict:
    """generate() inputs for several preprocessed prompts: ids left-padded to the longest, its attention mask, and
    the images' and videos' patches and grids concatenated in prompt order; with `video_seconds` (a family whose
    video positions count seconds: Qwen2.5-VL), each video's seconds per temporal grid step too."""
    length = max(len(p.token_ids) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt.token_ids):] = torch.tensor(prompt.token_ids)
        mask[row, length - len(prompt.token_ids):] = 1
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    for kind, pixels, grids in (("image", "pixel_values", "image_grid_thw"),
                                ("video", "pixel_values_videos", "video_grid_thw")):
        items = [v for p in prompts for v in p.visuals if v.kind == kind]
        if items:
            inputs[pixels] = torch.cat([v.pixel_values for v in items]).to(device)
            inputs[grids] = torch.tensor([list(v.grid_thw) for v in items], device=device)
    videos = [v for p in prompts for v in p.visuals if v.kind == "video"]
    if video_seconds and videos:
        inputs["second_per_grid_ts"] = torch.tensor([v.seconds_per_grid for v in videos], dtype=torch.float32,
                                                    device=device)
    return inputs


class ReferenceEngine:
    """transformers' implementation, one request at a time or in left-padded static batches."""

    def __init__(self, model_config, plan, preprocessor):
        """model_config: the kit's config.ModelConfig of the checkpoint (its family names the reference class)."""
        self.plan = plan
        self.preprocessor = preprocessor
        self.model = open_reference(model_config, plan)
        self.video_seconds = model_config.family.video_seconds
        # Left padding fills with generation_config.json's pad id (else an eos id): the attention mask hides it.
        eos = self.model.eos_token_id
        self.pad_token_id = self.model.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = (eos[0] if isinstance(eos, list) else eos) or 0

    def _generate(self, requests: list[Request], clock: _TokenClock) -> list:
        """The requests as one left-padded batch: every row generates the longest request's length."""
        prompts = [self.preprocessor(r.items) for r in requests]
        inputs = reference_inputs(prompts, self.pad_token_id, self.plan.device, self.video_seconds)
        max_tokens = max(r.max_tokens for r in requests)
        sequences = self.model.generate(inputs, clock, max_new_tokens=max_tokens, do_sample=False, temperature=None,
                                        top_p=None, top_k=None, repetition_penalty=1.0, eos_token_id=None,
                                        pad_token_id=self.pad_token_id)
        width = inputs["input_ids"].shape[1]
        return [sequences[row, width:width + r.max_tokens].tolist() for row, r in enumerate(requests)]

    def run_batched(self, requests: list[Request], batch_size: int) -> Timing:
        """Batches of batch_size requests in order; each batch runs to its longest request's length."""
        clocks, token_ids = [], []
        start = time.perf_counter()
        for first in range(0, len(requests), batch_size):
            clocks.append(_TokenClock(self.plan.synchronize))
            token_ids += self._generate(requests[first:first + batch_size], clocks[-1])
        seconds = time.perf_counter() - start
        times = clocks[0].times
        per_token = _per_token(times[0], times[requests[0].max_tokens - 1], requests[0].max_tokens)
        return Timing(seconds, times[0] - start, per_token, token_ids)

    def run_one_at_a_time(self, requests: list[Request]) -> Timing:
        return self.run_batched(requests, 1)

    def close(self) -> None:
        self.model.close()
