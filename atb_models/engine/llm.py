"""The user-facing front: `LLM(model_path, ...).generate(requests, SamplingParams(...))`."""
import dataclasses
import itertools
import logging
import numbers
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

from atb_models import distributed, quantization
from atb_models.config import completion_decoder, load_model_config, load_tokenizer
from atb_models.engine import speculative
from atb_models.engine.block_manager import BlockManager
from atb_models.engine.limits import check_limits, check_speculative
from atb_models.engine.logprobs import TokenBytes, add_prompt_logprobs, record_logprobs, split_prompt_rows
from atb_models.engine.model_runner import ModelRunner
from atb_models.engine.sampling_params import BeamSearchParams, SamplingParams
from atb_models.engine.scheduler import Scheduler
from atb_models.engine.sequence import Sequence, SequenceStatus
from atb_models.engine.structured_output import Matchers
from atb_models.errors import UserError
from atb_models.layers.sampler import sample
from atb_models.layers.sharding import ceil_div
from atb_models.multimodal.prompt import ProcessedPrompt, describe_request
from atb_models.platform import free_memory_bytes, resolve_plan
from atb_models.ranks import env_state

logger = logging.getLogger("atb_models")
# Chunked prefill's prompt tokens per step where max_prefill_tokens is left at -1.
CHUNKED_PREFILL_TOKENS = 2048


@dataclass
class RequestOutput:
    request_id: int
    prompt: str                     # the request as shown to a person ("<image: a.jpg> What is this?")
    text: str = ""
    token_ids: list = field(default_factory=list)
    prompt_token_count: int = 0
    # "stop" (an eos token or a stop string), "length" (max tokens), "abort" (LLM.abort) or "error"; None while the
    # request runs (the outputs LLM.step returns for each token).
    finish_reason: Optional[str] = "error"
    error: Optional[str] = None     # why this request failed; the other requests are unaffected
    # What ended a "stop": the stop string or the stop token id (stop_token_ids, or an eos id of generation_config
    # other than the tokenizer's); None for the tokenizer's eos, a complete structured output, or another
    # finish_reason (vLLM's field).
    stop_reason: Optional[object] = None
    # Seconds since generate() was called (for add_request's requests: since the engine was built or the last
    # generate() began): when the request's prefill step began, when its first token and its last token were ready.
    # Under continuous batching, first_token_s - admitted_s is the request's own time to first token and
    # finished_s - admitted_s its own latency.
    admitted_s: Optional[float] = None
    first_token_s: Optional[float] = None
    finished_s: Optional[float] = None
    # Prefix caching: prompt tokens whose K/V came from the cache, and images / videos whose vision-tower run was
    # skipped (their tokens all cached, or their features in the vision-encoder cache); at the request's last
    # admission (a preempted request is admitted again).
    cached_prompt_tokens: int = 0
    cached_visual_items: int = 0
    # Where SamplingParams.logprobs asks: an engine.logprobs.TokenLogprob per generated token (rank 0), else None.
    logprobs: Optional[list] = None
    # Where SamplingParams.prompt_logprobs asks: None for the first prompt token, then a TokenLogprob for each other
    # prompt token given those before it (rank 0), set once the prompt is computed; else None.
    prompt_logprobs: Optional[list] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpeculativeStats:
    """Speculative decoding's guessed tokens since the engine was built, and those the model agreed with."""
    proposed: int = 0
    accepted: int = 0


@dataclass
class StepRecord:
    """Timing of one engine step, for the benchmark mode."""
    is_prefill: bool
    num_seqs: int
    num_tokens: int  # the tokens the step computed (a prefill: less each sequence's cached prefix)
    seconds: float


class LLM:
    def __init__(self, model_path: str, dtype: str = "auto", device: str = "auto", max_batch_size: int = 8,
                 max_input_length: int = 4096, max_output_length: int = 256, block_size: int = 128,
                 max_prefill_tokens: int = -1, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                 video_fps: float = 0.5, video_max_frames: int = 768, num_blocks: Optional[int] = None,
                 shm_name_save_path: str = "./shm_name.txt", quantize: Optional[str] = None,
                 enable_prefix_caching: bool = True, encoder_cache_mb: int = 256, cpu_linear: Optional[str] = None,
                 enable_chunked_prefill: bool = False, num_speculative_tokens: int = 0, prompt_lookup_max: int = 3,
                 chat_template: Optional[str] = None, limit_mm_per_prompt: Optional[dict] = None):
        """quantize: "w8a16" quantizes a float checkpoint's language-model linears to int8 as they load (a
        checkpoint quantized by `python -m atb_models.quantize` runs as it is saved, without asking).
        enable_prefix_caching: reuse the K/V of full blocks a request shares with earlier ones (same tokens, same
        images) instead of computing them again, and keep the vision tower's outputs in an LRU of
        encoder_cache_mb MiB; the tokens are the same either way.
        enable_chunked_prefill: compute a prompt max_prefill_tokens (default then CHUNKED_PREFILL_TOKENS) at a
        time, alternating with the decode steps of running requests (engine.scheduler), so a long prompt holds
        them up one chunk at a time, and prompts longer than max_prefill_tokens are taken.
        cpu_linear: the CPU's kernels (kernels.linear.CPU_LINEAR_CHOICES; default $ATB_MODELS_CPU_LINEAR, else
        "auto"): "panel" keeps float32 weights in float32 where "auto" packs those that are exact bfloat16 values
        at half the bytes (the benchmark's float32-weights reference).
        num_speculative_tokens: speculative decoding by prompt lookup (engine.speculative; 0: off): a greedy
        request's decode step also checks up to this many tokens guessed from the prompt and answer so far, where
        the last prompt_lookup_max (or fewer) tokens appeared before; the tokens are the same, steps fewer where
        guesses hold (`speculative_stats` counts them).
        chat_template: a Jinja chat template file that replaces the checkpoint's (one that shows the model its
        tools, say: examples/chat_templates).
        limit_mm_per_prompt: the most images and videos one request may hold, {"image": N, "video": M} (vLLM's
        name; either left out, or None: no limit); a request holding more fails alone, before its media are read."""
        check_limits(max_batch_size, max_input_length, max_output_length, block_size, max_prefill_tokens, num_blocks,
                     encoder_cache_mb)
        check_speculative(num_speculative_tokens, prompt_lookup_max)
        self.speculative_stats = SpeculativeStats()
        self.tokens_generated = 0  # since the engine was built (a drafted step may add several a request)
        self.max_batch_size, self.max_input_length = max_batch_size, max_input_length
        self.max_output_length, self.block_size = max_output_length, block_size
        for name, value in (("enable_prefix_caching", enable_prefix_caching),
                            ("enable_chunked_prefill", enable_chunked_prefill)):
            if not isinstance(value, bool):  # ("no" would be true)
                raise UserError(f"{name} must be True or False, got {value!r}")
        self.enable_prefix_caching, self.enable_chunked_prefill = enable_prefix_caching, enable_chunked_prefill
        self.model_config = load_model_config(model_path)
        self.quantization = quantization.resolve(quantize, self.model_config.quantization)
        # Under torchrun every rank builds the same engine on its own device; WORLD_SIZE etc. come from torchrun.
        self.parallel = env_state()
        self.plan = resolve_plan(device, dtype, self.model_config.torch_dtype, self.parallel.local_rank)
        distributed.init_distributed(self.plan, self.parallel)
        logger.info(self.plan.describe())
        self.tokenizer = load_tokenizer(model_path)
        # The answer's text, special tokens left out or kept (SamplingParams.skip_special_tokens)
        self._decoders = {skip: completion_decoder(self.tokenizer, skip) for skip in (True, False)}
        self.token_bytes = TokenBytes(self.tokenizer)  # a token's text and bytes, as logprobs report it
        self.matchers = Matchers(self.tokenizer, self.model_config.hf_config.vocab_size,
                                 self.model_config.eos_token_ids)
        from atb_models.multimodal.node_share import NodePreprocessor
        from atb_models.multimodal.prompt import Preprocessor

        self.preprocessor = Preprocessor(model_path, self.model_config.hf_config, self.tokenizer,
                                         min_pixels=min_pixels, max_pixels=max_pixels, video_fps=video_fps,
                                         video_max_frames=video_max_frames, max_input_length=self.max_input_length,
                                         chat_template=_read_template(chat_template),
                                         limit_mm_per_prompt=limit_mm_per_prompt)
        self.node_preprocessor = NodePreprocessor(self.preprocessor, self.parallel, shm_name_save_path)
        self.runner = ModelRunner(self.model_config, self.plan, block_size, self.quantization,
                                  encoder_cache_mb << 20 if self.enable_prefix_caching else 0, cpu_linear)
        # Nothing sized by the batch exists yet: the memory budget is known now, so the batch is capped before the
        # KV cache, the prefill budget and generate()'s look-ahead are sized from it.
        one_request = ceil_div(self.max_model_len, self.block_size)
        affordable = self._affordable_blocks(one_request)
        num_blocks = self._kv_cache_blocks(num_blocks, one_request, affordable)
        self.max_batch_size = self._batch_size_within(one_request, affordable)
        if max_prefill_tokens == -1:
            max_prefill_tokens = (CHUNKED_PREFILL_TOKENS if enable_chunked_prefill else
                                  self.max_batch_size * self.max_model_len)
        self.max_prefill_tokens = max_prefill_tokens
        self.runner.allocate_kv_cache(num_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, block_size,
                    num_blocks * self.runner.bytes_per_block / 2**20)
        self.block_manager = BlockManager(num_blocks, block_size, self.enable_prefix_caching,
                                          cache_decoded_blocks=self.plan.llm_dtype == torch.float32)
        self.scheduler = Scheduler(self.block_manager, self.max_batch_size, self.max_prefill_tokens,
                                   self.model_config.eos_token_ids, enable_chunked_prefill, num_speculative_tokens,
                                   prompt_lookup_max, self.runner.kernels.linear.rows_per_pass,
                                   self.tokenizer.eos_token_id)
        from atb_models.engine.beam_search import BeamSearch

        self.beams = BeamSearch(self)  # the beam searches (beam_search(), or add_request with BeamSearchParams)
        self.scheduler.admission_held = self.beams.holds
        self._beam_turn = False  # whether the next step, where both have work, is the beam searches' round
        self.step_records: list = []  # the steps of the latest generate() call
        self._generating = threading.Lock()  # one generate() at a time: they share the scheduler and the cache
        # Every request not yet finished, by id: its sequence and the output the steps keep up to date.
        self._requests: dict = {}
        self._next_request_id = 0
        self._arrivals = itertools.count()  # Sequence.arrival
        self._closed = False
        self._time_origin = time.perf_counter()

    def _affordable_blocks(self, one_request: int) -> int:
        """KV blocks that fit in the memory left after the weights: 90% of the device's free memory, half the
        host's available memory. The smallest figure of all ranks: every rank must size its cache and its batch
        alike, or their schedulers would part ways."""
        share = 0.5 if self.plan.kind == "cpu" else 0.9
        affordable = int(free_memory_bytes(self.plan) * share) // self.runner.bytes_per_block
        affordable = min(distributed.gather_objects(affordable))
        if affordable < one_request:
            raise UserError(f"not enough memory for the KV cache of one request of --max_input_length + "
                            f"--max_output_length tokens ({one_request} blocks of "
                            f"{self.runner.bytes_per_block / 2**20:.1f} MiB, {affordable} affordable): "
                            f"lower those limits or free memory")
        return affordable

    def _kv_cache_blocks(self, requested: Optional[int], one_request: int, affordable: int) -> int:
        """Blocks for max_batch_size requests (as asked for, before any cap) of the longest allowed length, or
        `requested`, within the budget."""
        wanted = one_request * self.max_batch_size if requested is None else requested
        if wanted > affordable:
            logger.warning("KV cache reduced from %d to %d blocks to fit in memory; requests wait for blocks",
                           wanted, affordable)
            return affordable
        return wanted

    def _batch_size_within(self, one_request: int, affordable: int) -> int:
        """max_batch_size, capped at the number of requests of the longest allowed length whose KV blocks fit in
        memory: a batch beyond it at those lengths could never run at once, and the figure also sizes the prefill
        budget and how many prompts generate() preprocesses ahead (their pixels held in memory)."""
        fits = affordable // one_request
        if self.max_batch_size <= fits:
            return self.max_batch_size
        logger.warning("--max_batch_size %d capped to %d: the memory left for the KV cache (%d blocks of %.1f MiB) "
                       "holds %d requests of --max_input_length + --max_output_length (%d) tokens; lower those "
                       "limits to batch more", self.max_batch_size, fits, affordable,
                       self.runner.bytes_per_block / 2**20, fits, self.max_model_len)
        return fits

    # ------------------------------------------------------------------------------------------ requests
    def _make_sequence(self, request_id: int, prompt, params: SamplingParams, output: RequestOutput):
        output.prompt = prompt.text
        output.prompt_token_count = len(prompt.token_ids)
        # The messages name no request: the output carries its request_id, and callers number requests their own way.
        if len(prompt.token_ids) > self.max_input_length:
            raise UserError(f"the prompt has {len(prompt.token_ids)} tokens (visual tokens included), more than "
                            f"--max_input_length {self.max_input_length}")
        max_tokens = params.max_tokens or self.max_output_length
        if max_tokens > self.max_output_length:
            raise UserError(f"max_tokens {max_tokens} exceeds --max_output_length {self.max_output_length}")
        if params.min_tokens > max_tokens:
            raise UserError(f"min_tokens {params.min_tokens} is more than max_tokens {max_tokens}")
        if len(prompt.token_ids) > self.max_prefill_tokens and not self.enable_chunked_prefill:
            raise UserError(f"the prompt has {len(prompt.token_ids)} tokens (visual tokens included), more than "
                            f"--max_prefill_tokens {self.max_prefill_tokens}")
        vocab_size = self.model_config.hf_config.vocab_size
        for name, ids in params.token_ids_named().items():
            if ids and max(ids) >= vocab_size:
                raise UserError(f"{name} names token id {max(ids)}, beyond the vocabulary (vocab_size {vocab_size})")
        needed = self.block_manager.blocks_for(len(prompt.token_ids) + max_tokens)
        if needed > self.block_manager.num_blocks:
            raise UserError(f"the prompt and max_tokens need {needed} KV blocks, the cache has only "
                            f"{self.block_manager.num_blocks}")
        seq = Sequence(request_id, prompt, params, max_tokens)
        seq.arrival = next(self._arrivals)
        if params.structured_output is not None:
            seq.matcher = self.matchers.matcher(params.structured_output)
        if params.bad_words:
            seq.bad_words = self._bad_word_tokens(params.bad_words)
        return seq

    def _bad_word_tokens(self, words: tuple) -> tuple:
        """Each bad word's token ids (vLLM's rule): the word without leading spaces, and after a space (how it reads
        inside a sentence) where that is as many tokens and starts with another; without repeats. Ids beyond the
        model's vocabulary (tokens it cannot draw) are no threat."""
        vocab_size = self.model_config.hf_config.vocab_size
        found = set()
        for word in words:
            alone = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            for ids in (alone, spaced) if len(spaced) == len(alone) and spaced[:1] != alone[:1] else (alone,):
                if ids and ids[-1] < vocab_size:
                    found.add(ids)
        return tuple(sorted(found))

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, requests: list, sampling_params=None, on_finish=None) -> list:
        """Run every request to completion with continuous batching; outputs come back in request order.
        A request that cannot run (a bad file, too long a prompt) gets an output with `error` set.
        `on_finish(output)`, when given, is called as each request ends (in completion order).
        A call that ends by an exception (an interrupt, an error from `on_finish`) drops all its sequences and
        frees their KV blocks before the exception leaves: the next call starts from a clean engine. It is built on
        the incremental API's primitives (`_admit`, `step`), so a request answers the same either way."""
        self._check_open("generate()")
        params_list = _params_per_request(requests, sampling_params)
        with self._whole_engine("generate()"):
            return self._generate(requests, params_list, on_finish)

    def beam_search(self, requests: list, params=None, on_finish=None) -> list:
        """Each request's `beam_width` likeliest answers by beam search (engine.beam_search: transformers' rule),
        as a BeamSearchOutput per request in order, its `sequences` best first (the best's `text` and `token_ids`
        also the output's own). `params`: a BeamSearchParams, or a list of them, one per request. A request that
        cannot run gets an output with `error` set; `on_finish(output)` as generate()'s. Like generate(), it has the
        engine to itself."""
        self._check_open("beam_search()")
        params_list = _params_per_request(requests, params, BeamSearchParams, "beam_search()", "params")
        with self._whole_engine("beam_search()"):
            return self._beam_search(requests, params_list, on_finish)

    def _beam_search(self, requests: list, params_list: list, on_finish) -> list:
        from atb_models.engine.beam_search import BeamSearchOutput

        outputs = [BeamSearchOutput(i, describe_request(r)) for i, r in enumerate(requests)]
        pending = self._started(requests)

        def room() -> bool:  # (prompts preprocessed ahead as far as the batch's rows: their pixels are held)
            return sum(s.params.beam_width for s in (*self.beams.waiting, *self.beams.running)) < self.max_batch_size

        def start(index: int, prompt) -> None:
            outputs[index] = self.beams.add(index, prompt, params_list[index]).output

        while pending or self.beams.has_work():
            self._check_open("beam_search()")  # (closed by an on_finish: as generate() stops)
            while pending and (not self.beams.waiting or room()):
                self._take([pending.pop()], outputs, on_finish, start)
            if self.beams.has_work():
                for output in self.beams.round():
                    if on_finish is not None:
                        on_finish(output)
        return outputs

    def _take(self, batch: list, outputs: list, on_finish, take) -> None:
        """A call's (index, request) pairs preprocessed together and each handed to `take(index, prompt)`; one that
        cannot run (a UserError of its preprocessing or of `take`) gets its output's error, reported with the
        output (the caller decides how to show it), and on_finish hears of it."""
        for (i, _), prompt in zip(batch, self.node_preprocessor([request for _, request in batch])):
            try:
                if isinstance(prompt, UserError):
                    raise prompt
                take(i, prompt)
            except UserError as e:
                outputs[i].error = str(e)
                if on_finish is not None:
                    on_finish(outputs[i])

    def _started(self, requests: list) -> list:
        """A call's clock and step records started; its (index, request) pairs last first, pop() taking the next."""
        self._time_origin = time.perf_counter()
        self.step_records = []
        return list(enumerate(requests))[::-1]

    @contextmanager
    def _whole_engine(self, call: str):
        """generate() and beam_search() have the engine to themselves: one call at a time, none while requests of
        add_request() are unfinished; a call starts with no sequence and every block free, and one that ends by an
        exception drops all its sequences and frees their blocks before the exception leaves."""
        if not self._generating.acquire(blocking=False):
            raise UserError(f"{call} cannot start: generate() or beam_search() is already running on this engine "
                            "(it cannot be called from on_finish or from another thread)")
        if self._requests:  # a call starts from an empty engine: it would drop them without a word
            self._generating.release()
            raise UserError(f"{call} cannot run while {len(self._requests)} request(s) taken by add_request() "
                            f"are unfinished: step() them to their end or abort() them first")
        # Nothing from before may be answered as this call's own (the prefix cache is kept: it holds no sequence).
        if self.scheduler.has_work() or self.beams.has_work() or self.block_manager.num_used_blocks:
            self._abort_all()
        try:
            yield
        except BaseException:
            self._abort_all()
            raise
        finally:
            self._generating.release()

    def _generate(self, requests: list, params_list: list, on_finish) -> list:
        outputs = [RequestOutput(i, describe_request(r)) for i, r in enumerate(requests)]
        pending = self._started(requests)
        while pending or self.has_unfinished():
            # Preprocess lazily, a little ahead of admission, so pixel tensors of a long dataset are not all
            # held at once.
            while pending and len(self.scheduler.waiting) <= self.max_batch_size:
                batch = [pending.pop() for _ in range(min(len(pending),
                                                          self.max_batch_size + 1 - len(self.scheduler.waiting)))]
                self._take(batch, outputs, on_finish,
                           lambda i, prompt: self._admit(i, prompt, params_list[i], outputs[i]))
            if not self.has_unfinished():
                continue
            for out in self.step():
                if out.finished and on_finish is not None:
                    on_finish(out)
        return outputs

    # ------------------------------------------------------------------------------------------ incremental API
    def add_request(self, request, params: Optional[SamplingParams] = None, request_id: Optional[int] = None) -> int:
        """Queue one request; it joins the running batch at the next `step`. Returns its id (`request_id` when
        given, which must not belong to an unfinished request). `request` is a list of items (or a conversation of
        `Message`s), preprocessed here, so under torchrun every rank adds the same requests in the same order; or a
        `ProcessedPrompt` already made by `self.preprocessor`, which a caller preprocessing on one rank hands to the
        others (the server). A request that cannot run raises UserError and leaves nothing behind."""
        self._check_open("add_request()")
        if self._generating.locked():
            raise UserError("add_request() cannot be used while generate() or beam_search() runs on this engine")
        params = SamplingParams() if params is None else params
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise UserError(f"add_request(): params must be a SamplingParams or a BeamSearchParams, got {params!r}")
        if request_id is None:
            request_id = self._next_request_id
        elif isinstance(request_id, bool) or not isinstance(request_id, numbers.Integral):  # True would be the id
            # 1; 1.5 would make every later id a float
            raise UserError(f"add_request(): request_id must be an integer, got {request_id!r}")
        request_id = int(request_id)  # a numpy integer too
        if request_id in self._requests:
            raise UserError(f"request id {request_id} belongs to a request that has not finished")
        self._next_request_id = max(self._next_request_id, request_id + 1)
        if isinstance(request, ProcessedPrompt):
            # A copy: a finished request drops its prompt's pixels (_record), and the caller may hand the same
            # prompt to other requests (n choices of one prompt) that have yet to run.
            prompt = dataclasses.replace(request)
        else:
            _params_per_request([request], None)  # the request's shape, checked before any work
            [prompt] = self.node_preprocessor([request])
            if isinstance(prompt, UserError):
                raise prompt
        if isinstance(params, BeamSearchParams):  # a beam search: its BeamSearchOutput comes once it ends
            search = self.beams.add(request_id, prompt, params)
            self._requests[request_id] = (search, search.output)
        else:
            self._admit(request_id, prompt, params, RequestOutput(request_id, prompt.text))
        return request_id

    def abort(self, request_id: int) -> Optional[RequestOutput]:
        """End an unfinished request now, waiting or running: its KV blocks are free at once. Its output, with
        finish_reason "abort"; None for an id that is unknown or already finished."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return None
        seq, output = entry
        if not isinstance(seq, Sequence):  # a beam search's
            return self.beams.abort(seq)
        self.scheduler.finish(seq, "abort")
        self._record(seq, output)
        return output

    @property
    def max_model_len(self) -> int:
        """The most tokens one request may hold, prompt and answer (vLLM's name): what the engine is sized for."""
        return self.max_input_length + self.max_output_length

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.beams.has_work()

    def step(self) -> list:
        """One scheduler step. Returns the output of every request it advanced (by one token, or by several in a
        drafted step: engine.speculative): `token_ids` and `text` so far (while it runs, less a trailing incomplete
        character or a partial stop string, so that the text only ever grows), and for one that finished its
        `finish_reason` and times. Nothing queued: []. Where beam searches run (add_request with a
        BeamSearchParams), steps and their rounds take turns; a round returns the BeamSearchOutput of each search
        it ended (a search's output comes once, whole)."""
        self._check_open("step()")
        if self.beams.has_work() and (self._beam_turn or not self.scheduler.has_work()):
            # Beam searches and the scheduler's requests take turns: a round of every search, then a step.
            return self._beam_round()
        self._beam_turn = True
        if not self.scheduler.has_work():
            return []
        seqs = self._run_step()
        if seqs is None:  # nothing the scheduler can run until a search ends: the searches' round instead
            return self._beam_round()
        outputs = []
        for seq in seqs:
            seq_output = self._requests.get(seq.seq_id)
            if seq_output is None:  # a sequence added to the scheduler directly (a test's)
                continue
            output = seq_output[1]
            output.text = self._text_so_far(seq, len(output.token_ids))
            self._record(seq, output)
            if output.finished:
                del self._requests[seq.seq_id]
            outputs.append(output)
        return outputs

    def _beam_round(self) -> list:
        self._beam_turn = False
        ended = self.beams.round()
        for output in ended:
            self._requests.pop(output.request_id, None)
        return ended

    def _admit(self, request_id: int, prompt, params: SamplingParams, output: RequestOutput) -> None:
        seq = self._make_sequence(request_id, prompt, params, output)
        output.finish_reason = None
        self.scheduler.add(seq)
        self._requests[request_id] = (seq, output)

    def _abort_all(self) -> None:
        self.scheduler.abort_all()
        self.beams.reset()
        self._requests.clear()

    def _decode_completion(self, seq: Sequence, ids: list) -> str:
        return self._decoders[seq.params.skip_special_tokens](ids)

    def _text_so_far(self, seq: Sequence, shown: int) -> str:
        """The sequence's text; the first stop string in it ends the request ("stop") and the text before it (or
        through it: include_stop_str_in_output). shown: its tokens before this step (the step added one, or a
        drafted step's several)."""
        if seq.params.stop and len(seq.completion_token_ids) - shown > 1:
            self._end_at_first_stop(seq, shown)
        text = self._decode_completion(seq, self._shown_tokens(seq))
        at, stop = self._first_stop(seq, len(seq.completion_token_ids), text)
        if at >= 0:
            if seq.status is not SequenceStatus.FINISHED:
                self.scheduler.finish(seq, "stop")
            seq.finish_reason, seq.stop_reason = "stop", stop
            return text[:at + len(stop)] if seq.params.include_stop_str_in_output else text[:at]
        if seq.status is SequenceStatus.FINISHED:
            return text
        # A tail that may start a stop string is held back even before min_tokens: the stop may end past them and
        # cut the text there, and text already shown (streamed) cannot be taken back.
        return _without_partial_stop(text.rstrip("\ufffd"), seq.params.stop)

    def _shown_tokens(self, seq: Sequence) -> list:
        """The completion's tokens whose text the answer shows: all of them, less the eos or stop token that ended
        it unless include_stop_str_in_output asks for that token's own text (vLLM's way)."""
        completion = seq.completion_token_ids
        if seq.ended_by_token and completion and not seq.params.include_stop_str_in_output:
            return completion[:-1]
        return completion

    def _first_stop(self, seq: Sequence, count: int, text: str) -> tuple:
        """Where the first stop string that ends the answer begins in `text`, the text of its first `count` tokens,
        and that string; (-1, None) for none. A stop string ends it only where it ends past its first min_tokens
        tokens (vLLM's rule): before them none is searched for."""
        stops, min_tokens = seq.params.stop, seq.params.min_tokens
        if not stops or count < min_tokens:
            return -1, None
        searched_from = 0
        if min_tokens:
            if seq.min_tokens_text_length is None:
                early = seq.completion_token_ids[:min_tokens]
                seq.min_tokens_text_length = len(self._decode_completion(seq, early))
            searched_from = seq.min_tokens_text_length
        found = [(i, stop) for stop in stops for i in [text.find(stop, max(0, searched_from - len(stop) + 1))]
                 if i >= 0]
        return min(found, default=(-1, None), key=lambda hit: hit[0])

    def _end_at_first_stop(self, seq: Sequence, shown: int) -> None:
        """A drafted step (engine.speculative) appended several tokens at once: the answer ends at the first of
        them whose text holds a stop string, as one token a step would have ended it (the tokens after it are
        dropped: the answer's tokens and its usage counts are the plain engine's)."""
        completion = seq.completion_token_ids
        for kept in range(shown + 1, len(completion)):
            if self._first_stop(seq, kept, self._decode_completion(seq, completion[:kept]))[0] >= 0:
                del seq.token_ids[seq.num_prompt_tokens + kept:]
                seq.ended_by_token = False  # (a stop token among those dropped ends it no more)
                self.tokens_generated -= len(completion) - kept
                return

    def _record(self, seq: Sequence, output: RequestOutput) -> None:
        """What a sequence's output says after a step or an abort: its tokens, and once finished why and when."""
        output.token_ids = seq.completion_token_ids
        output.cached_prompt_tokens = min(seq.num_cached_tokens, seq.num_prompt_tokens)
        output.cached_visual_items = seq.cached_visual_items
        if seq.params.logprobs is not None:
            output.logprobs = list(seq.logprobs)  # a copy: the server hands each step's output to another thread
        if seq.params.prompt_logprobs is not None and output.prompt_logprobs is None and not seq.wants_prompt_logprobs:
            output.prompt_logprobs = list(seq.prompt_logprobs)  # complete once the first token is drawn
        if seq.status is SequenceStatus.FINISHED:
            output.finish_reason, output.stop_reason = seq.finish_reason, seq.stop_reason
            seq.prompt.visuals = []  # pixel tensors are no longer needed once the sequence is done
        finished_at = seq.finished_at if output.finished else None
        output.admitted_s, output.first_token_s, output.finished_s = (
            None if t is None else t - self._time_origin for t in (seq.admitted_at, seq.first_token_at, finished_at))

    def teacher_forced_logits(self, request: list, tokens: list):
        """The logits [len(tokens), vocab] at each position of `tokens` given the request's prompt and the tokens
        before it, in one prefill over all of them (nothing cached, nothing sampled): the quantities a quantized
        model is checked against, and what a calibration pass runs its activations through."""
        seq = Sequence(0, self.preprocessor(request), SamplingParams(max_tokens=len(tokens)), len(tokens))
        for token in tokens[:-1]:
            seq.append_token(token)
        self.block_manager.allocate(seq, use_cache=False)  # every position computed, none read back
        try:
            return self.runner.run([seq], True, rows_from=seq.num_prompt_tokens - 1)
        finally:
            self.block_manager.free(seq)

    def close(self) -> None:
        """Remove this engine's shared-memory segments (also done at exit). A closed engine takes no more requests."""
        self.node_preprocessor.close()
        self._closed = True

    def _check_open(self, call: str) -> None:
        if self._closed:
            raise UserError(f"{call}: this engine was closed")

    def _run_step(self) -> list:
        """One scheduler step; returns the sequences that drew a token in it, each one token longer, or more in a
        drafted step (finished ones have their blocks freed); a prefill chunk that leaves part of its prompt for
        later draws none. None where it can run nothing until a beam search starts or ends (its prompts wait
        behind one that came first, or for the blocks the searches hold or are promised)."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            if self.beams.has_work():
                return None
            raise RuntimeError("scheduler produced an empty step while work remains")
        start = time.perf_counter()
        num_tokens = (sum(s.prefill_end - s.prefill_start for s in seqs) if is_prefill  # computed
                      else sum(1 + len(s.draft_tokens) for s in seqs))
        ran = seqs
        # A seeded sequence's generator as it was: a step cut short after some rows drew (Ctrl-C in the sampler, a
        # later row's error) must not leave their generators advanced, or the redrawn tokens would differ.
        generators = [(seq.generator, seq.generator.get_state()) for seq in seqs if seq.generator is not None]
        prompt_logprobs = []
        try:
            logits = self.runner.run(seqs, is_prefill)
            if is_prefill:
                # (prompt logprobs are taken here, applied once the step has succeeded: add_prompt_logprobs)
                logits, prompt_logprobs = split_prompt_rows(logits, seqs, self.parallel.rank == 0)
                # A chunk that leaves part of its prompt for later draws nothing (nor a seeded draw).
                done = self.scheduler.prefill_done(seqs)
                if len(done) < len(seqs):
                    drawing = {id(seq) for seq in done}
                    logits = logits[[i for i, seq in enumerate(seqs) if id(seq) in drawing]]
                seqs = done
            if not is_prefill and any(seq.draft_tokens for seq in seqs):
                tokens = self._on_rank0(lambda: speculative.draw(logits, seqs, self._sample))
                self.speculative_stats.proposed += sum(len(seq.draft_tokens) for seq in seqs)
                self.speculative_stats.accepted += sum(len(t) - 1 for t in tokens if isinstance(t, list))
                logits = speculative.first_rows(logits, seqs)  # (the logprobs' rows: one a sequence)
            else:
                tokens = self._on_rank0(lambda: self._sample(logits, seqs)) if seqs else []
            self.plan.synchronize()
        except BaseException:
            # A step cut short (Ctrl-C, an error) wrote its prompts' K/V in part or not at all: left running, those
            # sequences would decode over unwritten K/V, and their blocks, cached at admission, would be reused by
            # later prompts. They wait again instead, so a later step() computes them as if this one never ran.
            # (A cut decode step needs no more: its token was not appended, the next step writes the same slot.)
            if is_prefill:
                self.scheduler.undo_admission(ran)
            for generator, state in generators:
                generator.set_state(state)
            raise
        add_prompt_logprobs(prompt_logprobs)
        if self.parallel.rank == 0:
            record_logprobs(logits, seqs, tokens)
        end = time.perf_counter()
        if self._generating.locked():  # the steps of generate() alone: a server's would pile up for ever
            self.step_records.append(StepRecord(is_prefill, len(ran), num_tokens, end - start))
        for seq in ran:
            if seq.admitted_at is None:
                seq.admitted_at = start
        for seq in seqs:
            if seq.first_token_at is None:
                seq.first_token_at = end
            seq.finished_at = end  # the time of its latest token, kept once it finishes
        lengths = sum(seq.num_tokens for seq in seqs)
        self.scheduler.finish_step(seqs, tokens)
        self.tokens_generated += sum(seq.num_tokens for seq in seqs) - lengths
        return seqs

    def _sample(self, logits, seqs: list) -> list:
        return sample(logits, seqs, self.model_config.eos_token_ids)

    def _on_rank0(self, draw):
        """The step's tokens, drawn by `draw()` on rank 0 and broadcast: every rank holds the same gathered
        logits, and the others follow rank 0's tokens, so unseeded sampling cannot make ranks diverge. Should rank
        0's draw fail, the others get its error in place of the tokens and raise it too, in step, instead of waiting
        on a rank that has left."""
        if self.parallel.world_size == 1:
            return draw()
        drawn, failure = None, None
        if self.parallel.rank == 0:
            try:
                drawn = draw()
            except Exception as e:
                failure, drawn = e, f"{type(e).__name__}: {e}"
        drawn = distributed.broadcast_from_rank0(drawn)
        if isinstance(drawn, str):
            raise RuntimeError(f"sampling failed on rank 0: {drawn}") from failure
        return drawn


def _read_template(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            template = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the chat template {path}: {getattr(e, 'strerror', None) or e}") from None
    if not template.strip():  # (the Preprocessor would take the checkpoint's instead, without a word)
        raise UserError(f"the chat template {path} is empty")
    return template


def _without_partial_stop(text: str, stops: tuple) -> str:
    """text less a tail that may be the start of a stop string: it is shown once the next tokens tell.
    Each step of each running request asks this, so a stop string is tried only at the places in its reach where
    its first character is (str.find), not at every length up to the longest stop's: long stop strings made every
    step of the whole batch slow."""
    keep = len(text)
    for stop in stops:
        # A tail shorter than the stop (a whole one would have ended the request) that starts with its first character
        i = text.find(stop[0], max(0, len(text) - len(stop) + 1))
        while 0 <= i < keep:
            if stop.startswith(text[i:]):
                keep = i  # the longest such tail for this stop; the earliest of all stops' is held back
                break
            i = text.find(stop[0], i + 1)
    return text[:keep]


def _params_per_request(requests, params, kind=SamplingParams, call: str = "generate()",
                        argument: str = "sampling_params") -> list:
    """One `kind` (SamplingParams, or beam search's BeamSearchParams) per request, after checking the shapes the
    call was given (before any work)."""
    if not isinstance(requests, (list, tuple)):
        raise UserError(f"{call} takes a list of requests, each a list of items such as {{'text': ...}}; "
                        f"got {type(requests).__name__}")
    for i, request in enumerate(requests):
        if not isinstance(request, (list, tuple)):
            raise UserError(f"{call}: requests[{i}] is {type(request).__name__}, not a list of items such as "
                            f"{{'text': ...}}")
    name = kind.__name__
    if params is None or isinstance(params, kind):
        return [params or kind()] * len(requests)
    if not isinstance(params, (list, tuple)):
        raise UserError(f"{call}: {argument} must be a {name} or a list of them, one per request; got "
                        f"{type(params).__name__}")
    if len(params) != len(requests):
        raise UserError(f"{call}: {len(params)} {name} for {len(requests)} requests; give one, or one per request")
    for i, each in enumerate(params):
        if not isinstance(each, kind):
            raise UserError(f"{call}: {argument}[{i}] is {each!r}, not a {name}")
    return list(params)

