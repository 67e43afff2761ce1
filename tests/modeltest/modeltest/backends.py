"""The two ways the harness runs a model on the same prompts: the kit's paged-attention engine (`pa`) and
transformers' reference implementation (`hf`). Both take their inputs from the kit's preprocessor, decode greedily
and stop on the checkpoint's eos ids, so their answers can be compared one for one."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable


from atb_models import LLM, SamplingParams, UserError
from atb_models.benchmark.engines import open_reference, reference_inputs
from atb_models.config import load_model_config as load_checkpoint_config, load_tokenizer
from atb_models.multimodal.prompt import Preprocessor
from atb_models.platform import resolve_plan

from modeltest.config import ModelConfig, TaskConfig

logger = logging.getLogger("modeltest")


@dataclass
class Generation:
    text: str = ""
    token_count: int = 0            # generated tokens, the eos token included
    prompt_token_count: int = 0     # visual tokens included
    seconds: float = 0.0            # from the sample's first model step to its last
    finish_reason: str = "error"    # "stop", "length" or "error"
    error: str | None = None
    cached_prompt_tokens: int = 0   # prompt tokens whose K/V came from the prefix cache (pa)
    cached_visual_items: int = 0    # images / videos that skipped the vision tower (pa)


class KitBackend:
    name = "pa"
    description = "atb_models paged-attention engine, continuous batching"

    def __init__(self, model: ModelConfig, task: TaskConfig, batch_size: int, max_new_tokens: int, dtype: str,
                 device: str, quantize: str | None = None, enable_prefix_caching: bool = True):
        infer = model.infer_params
        # The task's requested lengths size the KV cache; max_new_tokens is what each answer may use.
        self.llm = LLM(model.model_path, dtype=dtype, device=device, max_batch_size=batch_size,
                       max_input_length=task.requested_max_input_length,
                       max_output_length=task.requested_max_output_length, block_size=model.block_size,
                       min_pixels=infer.min_pixels, max_pixels=infer.max_pixels, video_fps=infer.video_fps,
                       video_max_frames=infer.video_max_frames, quantize=quantize,
                       enable_prefix_caching=enable_prefix_caching)
        self.plan = self.llm.plan
        if not enable_prefix_caching:
            self.description = f"{self.description}, prefix caching off"
        if self.llm.quantization is not None:
            self.name = f"pa_{self.llm.quantization.method}"
            self.description = f"{self.description}, weights {self.llm.quantization.describe()}"
        self.params = SamplingParams(max_tokens=max_new_tokens)

    def generate(self, requests: list, on_done: Callable[[], None]) -> list[Generation]:
        outputs = self.llm.generate(requests, self.params, on_finish=lambda out: on_done())
        # Under continuous batching a request's own latency runs from its prefill step to its last token.
        return [Generation(out.text, len(out.token_ids), out.prompt_token_count,
                           0.0 if out.error is not None else out.finished_s - out.admitted_s, out.finish_reason,
                           out.error, out.cached_prompt_tokens, out.cached_visual_items)
                for out in outputs]


class HFBackend:
    """transformers' implementation of the checkpoint's family: the registry's reference class (atb_models.models),
    in this process or, where the pinned transformers lacks it (Qwen2.5-VL), in the reference venv's worker."""

    name = "hf"

    def __init__(self, model: ModelConfig, task: TaskConfig, max_new_tokens: int, dtype: str, device: str):
        checkpoint = load_checkpoint_config(model.model_path)
        self.video_seconds = checkpoint.family.video_seconds
        self.plan = resolve_plan(device, dtype, checkpoint.torch_dtype)
        logger.info(self.plan.describe())
        self.tokenizer = load_tokenizer(model.model_path)
        infer = model.infer_params
        self.preprocessor = Preprocessor(model.model_path, checkpoint.hf_config, self.tokenizer,
                                         min_pixels=infer.min_pixels, max_pixels=infer.max_pixels,
                                         video_fps=infer.video_fps, video_max_frames=infer.video_max_frames)
        try:
            self.model = open_reference(checkpoint, self.plan)
        except UserError as e:
            raise UserError(f"--backend hf: {e}") from None
        self.description = f"{self.model.description}, one sample at a time"
        self.eos_token_ids = list(checkpoint.eos_token_ids)
        self.max_input_length = task.requested_max_input_length
        self.max_new_tokens = max_new_tokens

    def generate(self, requests: list, on_done: Callable[[], None]) -> list[Generation]:
        generations = []
        for request in requests:
            try:
                generations.append(self._generate_one(request))
            except UserError as e:
                generations.append(Generation(error=str(e)))
            except Exception as e:  # noqa: BLE001 - one sample's failure is recorded; the run goes on
                logger.debug("sample failed", exc_info=True)
                generations.append(Generation(error=f"{type(e).__name__}: {e}"))
            on_done()
        return generations

    def _generate_one(self, request: list) -> Generation:
        prompt = self.preprocessor(request)
        if len(prompt.token_ids) > self.max_input_length:
            raise UserError(f"the prompt has {len(prompt.token_ids)} tokens (visual tokens included), more than the "
                            f"task's requested_max_input_length {self.max_input_length}")
        pad_token_id = self.eos_token_ids[0]  # one prompt: nothing is padded
        inputs = reference_inputs([prompt], pad_token_id, self.plan.device, self.video_seconds)
        start = time.perf_counter()
        # Plain greedy decoding as the kit does it, whatever sampling settings generation_config.json holds.
        sequences = self.model.generate(inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                        temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                                        eos_token_id=self.eos_token_ids, pad_token_id=pad_token_id)
        self.plan.synchronize()
        seconds = time.perf_counter() - start
        tokens = sequences[0, len(prompt.token_ids):].tolist()
        finish_reason = "stop" if tokens and tokens[-1] in self.eos_token_ids else "length"
        return Generation(self.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens),
                          len(prompt.token_ids), seconds, finish_reason)
