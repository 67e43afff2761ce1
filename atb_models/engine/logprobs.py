"""Log-probabilities of the generated tokens, for requests that ask for them (SamplingParams.logprobs).

They are the model's own distribution: log-softmax of the raw logits in float32, before the repetition penalty,
temperature, top-k and top-p shape the draw (vLLM's default, and what OpenAI's `logprobs` reports), so a token's
logprob does not depend on how it was sampled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its id and logprob, and the `SamplingParams.logprobs` most likely tokens of that step
    as (id, logprob), most likely first (the chosen token among them when it ranks there)."""

    token_id: int
    logprob: float
    top: tuple = ()


def record_logprobs(logits: torch.Tensor, seqs: list, tokens: list) -> None:
    """Append each asking sequence's TokenLogprob for the token drawn from its row of `logits` [rows, vocab]."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not rows:
        return
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1).cpu()
    for row, i in zip(logprobs, rows):
        seq, token, count = seqs[i], tokens[i], seqs[i].params.logprobs
        top = ()
        if count:
            best = torch.topk(row, min(count, row.shape[0]))
            top = tuple(zip(best.indices.tolist(), best.values.tolist()))
        seq.logprobs.append(TokenLogprob(token, float(row[token]), top))


class TokenBytes:
    """A token id's bytes and its text as one token shows alone, for a byte-level BPE tokenizer (Qwen2's): a token
    may hold part of a character, so its text alone can be U+FFFD where its bytes are exact. Cached per id."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        decoder = type(tokenizer.backend_tokenizer.decoder).__name__ if tokenizer.is_fast else ""
        self._byte_of = None
        if decoder == "ByteLevel":
            from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

            self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._cache: dict = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            piece = None if token_id in self._added else self._tokenizer.convert_ids_to_tokens(token_id)
            if piece and self._byte_of is not None and all(c in self._byte_of for c in piece):
                raw = bytes(self._byte_of[c] for c in piece)
            else:  # an added (special) token, or a tokenizer that is not byte-level
                raw = (self._added.get(token_id) or self._tokenizer.decode([token_id])).encode("utf-8")
            found = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return found
