"""The engine's size limits, checked: torch-free, so that a command line refuses a bad one before torch and the
checkpoint load (`atb_models.cli.prepare`) with the words `LLM` would use."""

from __future__ import annotations

from atb_models.errors import UserError


def positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"--{name} must be a positive integer, got {value!r}")
    return value


MAX_SPECULATIVE_TOKENS = 16  # guessed tokens a decode step checks (engine.speculative)
MAX_PROMPT_LOOKUP = 8        # the longest run of last tokens looked up


def check_speculative(num_speculative_tokens: int, prompt_lookup_max: int) -> None:
    for name, value, low, high in (("num_speculative_tokens", num_speculative_tokens, 0, MAX_SPECULATIVE_TOKENS),
                                   ("prompt_lookup_max", prompt_lookup_max, 1, MAX_PROMPT_LOOKUP)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UserError(f"--{name} must be an integer in {low}..{high}, got {value!r}")


def check_limits(max_batch_size: int, max_input_length: int, max_output_length: int, block_size: int,
                 max_prefill_tokens: int = -1, num_blocks: int | None = None, encoder_cache_mb: int = 256) -> None:
    """Each limit a positive integer (max_prefill_tokens may be -1: sized from the batch once memory has capped
    it; encoder_cache_mb may be 0: no cache), or one UserError naming its flag."""
    for name, value in (("max_batch_size", max_batch_size), ("max_input_length", max_input_length),
                        ("max_output_length", max_output_length), ("block_size", block_size)):
        positive(name, value)
    if max_prefill_tokens != -1:
        positive("max_prefill_tokens", max_prefill_tokens)
    if num_blocks is not None:
        positive("num_blocks", num_blocks)
    if isinstance(encoder_cache_mb, bool) or not isinstance(encoder_cache_mb, int) or encoder_cache_mb < 0:
        raise UserError(f"--encoder_cache_mb must be a whole number of MiB, 0 or more, got {encoder_cache_mb!r}")
