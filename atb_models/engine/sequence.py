"""One request's state as it moves through the engine."""
import hashlib
from enum import Enum, auto
from typing import Optional

import torch

from atb_models.engine.sampling_params import SamplingParams


def generator_seed(seed: int) -> int:
    """The seed given to torch's CPU generator: a seed below 2**32 as it is, a larger one hashed to 32 bits. The
    generator (mt19937) keeps only a seed's low 32 bits, so 1 and 2**32 + 1 would otherwise draw alike."""
    if seed < 2**32:
        return seed
    return int.from_bytes(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=4).digest(), "little")


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, seq_id: int, prompt, params: SamplingParams, max_tokens: int):
        self.seq_id = seq_id
        self.prompt = prompt                      # multimodal.ProcessedPrompt
        self.params = params
        self.max_tokens = max_tokens
        # The order the engine took its request in (LLM._make_sequence): the scheduler's prompts and the beam
        # searches waiting for room start first come, first served (engine.beam_search).
        self.arrival = 0
        self.token_ids = list(prompt.token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        # The tokens whose K/V its latest prefill wrote (a preempted sequence's recompute covers generated ones too):
        # decode steps wrote the rest (block_manager's cache_decoded_blocks).
        self.decode_from = self.num_prompt_tokens
        self.block_table: list = []
        # Prefix caching (engine.block_manager): where each image / video's tokens lie and what it is, the hash
        # chain of the full blocks so far, the prompt tokens whose K/V came from the cache at admission, and how
        # many leading blocks of the table are in the cache.
        self.visual_spans = [(v.start, v.num_tokens, v.content_hash) for v in prompt.visuals]
        self.block_hash_cache: list = []
        self.num_cached_tokens = 0
        self.num_hashed_blocks = 0
        self.cached_visual_items = 0  # images / videos whose vision-tower run was skipped at admission
        self.visuals_counted: set = set()  # the media cached_visual_items has decided on since admission
        # The prompt tokens the next prefill step computes, [prefill_start, prefill_end): set at admission (from
        # the cached prefix to the end, or a chunk of it under chunked prefill); None once the prompt is computed.
        self.prefill_start: Optional[int] = None
        self.prefill_end: Optional[int] = None
        self.status = SequenceStatus.WAITING
        self.finish_reason: Optional[str] = None
        self.stop_reason = None  # the stop string or stop token id that ended it ("stop" by eos or a constraint: None)
        self.ended_by_token = False  # whether its last token ended it, an eos or a stop token (the scheduler's call)
        self.bad_words: tuple = ()  # params.bad_words as token id sequences (the engine tokenizes them)
        self.allowed_mask: Optional[torch.Tensor] = None  # params.allowed_token_ids as a mask, once the sampler asks
        self.generator: Optional[torch.Generator] = None
        self.matcher = None  # a structured_output.SequenceMatcher where params.structured_output asks (every rank)
        self.min_tokens_text_length: Optional[int] = None  # the text's length at params.min_tokens tokens, once known
        # Speculative decoding: the tokens guessed to follow (engine.speculative), checked by the next decode step
        self.draft_tokens: list = []
        self.logprobs: list = []  # a TokenLogprob per generated token, where params.logprobs asks (rank 0 only)
        # Where params.prompt_logprobs asks: None for the first prompt token, then a TokenLogprob for each other, as
        # the prefill steps compute them (rank 0 only; every rank counts them alike: wants_prompt_logprobs).
        self.prompt_logprobs: list = []
        self.prompt_logprobs_counted = 0
        # perf_counter() times: the first prefill step's start, the first token, the latest token.
        self.admitted_at: Optional[float] = None
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(generator_seed(params.seed))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether its prefill steps still owe prompt logprobs: they then compute every row's logits, and the
        prompt is not read from the prefix cache."""
        return self.params.prompt_logprobs is not None and self.prompt_logprobs_counted < self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list:
        return self.token_ids[self.num_prompt_tokens:]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def decode_position(self) -> int:
        """The M-RoPE position of the latest token, a generated one in a decode step: the same on all three axes
        (positions(num_tokens - 1, num_tokens)'s value, without a tensor per sequence per step)."""
        return self.num_tokens - 1 + self.prompt.rope_delta

    def positions(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE positions [3, end - start] of tokens start..end-1: the prompt's come from `rope_index`, a
        generated token at index j sits at j + delta on all three axes."""
        prompt_positions = self.prompt.positions
        parts = []
        if start < self.num_prompt_tokens:
            parts.append(prompt_positions[:, start:min(end, self.num_prompt_tokens)])
        if end > self.num_prompt_tokens:
            first = max(start, self.num_prompt_tokens)
            generated = torch.arange(first, end, dtype=torch.long) + self.prompt.rope_delta
            parts.append(generated.unsqueeze(0).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
