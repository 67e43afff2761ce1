"""The user-facing front: `LLM(model_path, ...).generate(requests, SamplingParams(...))`."""
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from atb_models import distributed
from atb_models.config import load_model_config
from atb_models.engine.block_manager import BlockManager
from atb_models.engine.model_runner import ModelRunner
from atb_models.engine.sampling_params import SamplingParams
from atb_models.engine.scheduler import Scheduler
from atb_models.engine.sequence import Sequence
from atb_models.errors import UserError
from atb_models.layers.sampler import sample
from atb_models.multimodal.prompt import describe_request
from atb_models.platform import free_memory_bytes, resolve_plan

logger = logging.getLogger("atb_models")


@dataclass
class RequestOutput:
    request_id: int
    prompt: str                     # the request as shown to a person ("<image: a.jpg> What is this?")
    text: str = ""
    token_ids: list = field(default_factory=list)
    prompt_token_count: int = 0
    finish_reason: str = "error"    # "stop" (an eos token), "length" (max tokens) or "error"
    error: Optional[str] = None     # why this request failed; the other requests are unaffected
    # Seconds since generate() was called: when the request's prefill step began, when its first token and its
    # last token were ready. Under continuous batching, first_token_s - admitted_s is the request's own
    # time to first token and finished_s - admitted_s its own latency.
    admitted_s: Optional[float] = None
    first_token_s: Optional[float] = None
    finished_s: Optional[float] = None


@dataclass
class StepRecord:
    """Timing of one engine step, for the benchmark mode."""
    is_prefill: bool
    num_seqs: int
    num_tokens: int
    seconds: float


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise UserError(f"--{name} must be a positive integer, got {value!r}")
    return value


class LLM:
    def __init__(self, model_path: str, dtype: str = "auto", device: str = "auto", max_batch_size: int = 8,
                 max_input_length: int = 4096, max_output_length: int = 256, block_size: int = 128,
                 max_prefill_tokens: int = -1, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                 video_fps: float = 0.5, video_max_frames: int = 768, num_blocks: Optional[int] = None,
                 shm_name_save_path: str = "./shm_name.txt"):
        self.max_batch_size = _positive("max_batch_size", max_batch_size)
        self.max_input_length = _positive("max_input_length", max_input_length)
        self.max_output_length = _positive("max_output_length", max_output_length)
        self.block_size = _positive("block_size", block_size)
        if max_prefill_tokens == -1:
            max_prefill_tokens = max_batch_size * (max_input_length + max_output_length)
        self.max_prefill_tokens = _positive("max_prefill_tokens", max_prefill_tokens)
        self.model_config = load_model_config(model_path)
        # Under torchrun every rank builds the same engine on its own device; WORLD_SIZE etc. come from torchrun.
        self.parallel = distributed.env_state()
        self.plan = resolve_plan(device, dtype, self.model_config.torch_dtype, self.parallel.local_rank)
        distributed.init_distributed(self.plan, self.parallel)
        logger.info(self.plan.describe())
        self.tokenizer = _load_tokenizer(model_path)
        from atb_models.multimodal.node_share import NodePreprocessor
        from atb_models.multimodal.prompt import Preprocessor

        self.preprocessor = Preprocessor(model_path, self.model_config.hf_config, self.tokenizer,
                                         min_pixels=min_pixels, max_pixels=max_pixels, video_fps=video_fps,
                                         video_max_frames=video_max_frames)
        self.node_preprocessor = NodePreprocessor(self.preprocessor, self.parallel, shm_name_save_path)
        self.runner = ModelRunner(self.model_config, self.plan, block_size)
        num_blocks = self._kv_cache_blocks(num_blocks)
        self.runner.allocate_kv_cache(num_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, block_size,
                    num_blocks * self.runner.bytes_per_block / 2**20)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, self.max_batch_size, self.max_prefill_tokens,
                                   self.model_config.eos_token_ids)
        self.step_records: list = []  # the steps of the latest generate() call

    def _kv_cache_blocks(self, requested: Optional[int]) -> int:
        """Blocks for max_batch_size requests of the longest allowed length (or `requested`), within a budget of
        the memory left after the weights: 90% of the device's free memory, half the host's available memory."""
        one_request = -(-(self.max_input_length + self.max_output_length) // self.block_size)
        wanted = one_request * self.max_batch_size if requested is None else _positive("num_blocks", requested)
        share = 0.5 if self.plan.kind == "cpu" else 0.9
        affordable = int(free_memory_bytes(self.plan) * share) // self.runner.bytes_per_block
        if affordable < one_request:
            raise UserError(f"not enough memory for the KV cache of one request of --max_input_length + "
                            f"--max_output_length tokens ({one_request} blocks of "
                            f"{self.runner.bytes_per_block / 2**20:.1f} MiB, {affordable} affordable): "
                            f"lower those limits or free memory")
        if wanted > affordable:
            logger.warning("KV cache reduced from %d to %d blocks to fit in memory; requests wait for blocks",
                           wanted, affordable)
            return affordable
        return wanted

    # ------------------------------------------------------------------------------------------ requests
    def _make_sequence(self, request_id: int, prompt, params: SamplingParams, output: RequestOutput):
        output.prompt = prompt.text
        output.prompt_token_count = len(prompt.token_ids)
        if len(prompt.token_ids) > self.max_input_length:
            raise UserError(f"request {request_id}: the prompt has {len(prompt.token_ids)} tokens (visual tokens "
                            f"included), more than --max_input_length {self.max_input_length}")
        max_tokens = params.max_tokens or self.max_output_length
        if max_tokens > self.max_output_length:
            raise UserError(f"request {request_id}: max_tokens {max_tokens} exceeds --max_output_length "
                            f"{self.max_output_length}")
        if len(prompt.token_ids) > self.max_prefill_tokens:
            raise UserError(f"request {request_id}: the prompt has {len(prompt.token_ids)} tokens, more than "
                            f"--max_prefill_tokens {self.max_prefill_tokens}")
        needed = self.block_manager.blocks_for(len(prompt.token_ids) + max_tokens)
        if needed > self.block_manager.num_blocks:
            raise UserError(f"request {request_id}: needs {needed} KV blocks, the cache has only "
                            f"{self.block_manager.num_blocks}")
        return Sequence(request_id, prompt, params, max_tokens)

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, requests: list, sampling_params=None, on_finish=None) -> list:
        """Run every request to completion with continuous batching; outputs come back in request order.
        A request that cannot run (a bad file, too long a prompt) gets an output with `error` set.
        `on_finish(output)`, when given, is called as each request ends (in completion order)."""
        if isinstance(requests, dict) or (requests and isinstance(requests[0], dict)):
            raise UserError("generate() takes a list of requests, each a list of items such as {'text': ...}")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(requests)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(requests):
                raise UserError(f"{len(params_list)} SamplingParams for {len(requests)} requests")
        outputs = [RequestOutput(i, describe_request(r)) for i, r in enumerate(requests)]
        started = time.perf_counter()
        self.step_records = []
        pending = list(enumerate(requests))
        pending.reverse()
        while pending or self.scheduler.has_work():
            # Preprocess lazily, a little ahead of admission, so pixel tensors of a long dataset are not all
            # held at once.
            while pending and len(self.scheduler.waiting) <= self.max_batch_size:
                batch = [pending.pop() for _ in range(min(len(pending),
                                                          self.max_batch_size + 1 - len(self.scheduler.waiting)))]
                for (i, _), prompt in zip(batch, self.node_preprocessor([request for _, request in batch])):
                    try:
                        if isinstance(prompt, UserError):
                            raise prompt
                        self.scheduler.add(self._make_sequence(i, prompt, params_list[i], outputs[i]))
                    except UserError as e:
                        outputs[i].error = str(e)  # reported with the output; the caller decides how to show it
                        if on_finish is not None:
                            on_finish(outputs[i])
            if not self.scheduler.has_work():
                continue
            for seq in self.step():
                out = outputs[seq.seq_id]
                out.token_ids = seq.completion_token_ids
                out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
                out.finish_reason = seq.finish_reason
                out.admitted_s, out.first_token_s, out.finished_s = (
                    t - started for t in (seq.admitted_at, seq.first_token_at, seq.finished_at))
                if on_finish is not None:
                    on_finish(out)
        return outputs

    def close(self) -> None:
        """Remove this engine's shared-memory segments (also done at exit)."""
        self.node_preprocessor.close()

    def step(self) -> list:
        """One scheduler step; returns the sequences that finished in it."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            raise RuntimeError("scheduler produced an empty step while work remains")
        start = time.perf_counter()
        logits = self.runner.run(seqs, is_prefill)
        # Every rank holds the same gathered logits; rank 0 draws and the others follow its tokens, so unseeded
        # sampling cannot make ranks diverge.
        tokens = distributed.broadcast_from_rank0(sample(logits, seqs) if self.parallel.rank == 0 else None)
        self.plan.synchronize()
        end = time.perf_counter()
        num_tokens = sum(s.num_tokens for s in seqs) if is_prefill else len(seqs)
        self.step_records.append(StepRecord(is_prefill, len(seqs), num_tokens, end - start))
        for seq in seqs:
            if seq.admitted_at is None:
                seq.admitted_at, seq.first_token_at = start, end
        finished = self.scheduler.finish_step(seqs, tokens)
        for seq in finished:
            seq.finished_at = end
            seq.prompt.visuals = []  # pixel tensors are no longer needed once the sequence is done
        return finished


def _load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer from {model_path}: {e}") from None
