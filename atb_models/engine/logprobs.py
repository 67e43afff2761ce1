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
    as (id, logprob), most likely first (the chosen token among them when it ranks there); `rank`: 1 + the number
    of tokens more likely than it (vLLM's)."""

    token_id: int
    logprob: float
    top: tuple = ()
    rank: int = 1


# Rows whose log-softmax is taken at once: a long prompt's logprobs cost this many rows' copies beyond its logits.
LOGPROB_ROWS = 256


def token_logprobs(logits: torch.Tensor, tokens: list, count: int) -> list:
    """A TokenLogprob for each row of `logits` [rows, vocab] and the token of that row, with `count` top tokens;
    LOGPROB_ROWS rows at a time."""
    if len(tokens) > LOGPROB_ROWS:
        return [entry for at in range(0, len(tokens), LOGPROB_ROWS)
                for entry in token_logprobs(logits[at:at + LOGPROB_ROWS], tokens[at:at + LOGPROB_ROWS], count)]
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    tops = [()] * len(tokens)
    if count:
        best = torch.topk(logprobs, min(count, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    chosen = logprobs.gather(1, torch.tensor(tokens, dtype=torch.long).unsqueeze(1))
    ranks = ((logprobs > chosen).sum(1) + 1).tolist()
    return [TokenLogprob(token, value, top, rank)
            for token, value, top, rank in zip(tokens, chosen.squeeze(1).tolist(), tops, ranks)]


def record_logprobs(logits: torch.Tensor, seqs: list, tokens: list) -> None:
    """Append each asking sequence's TokenLogprob for the token drawn from its row of `logits` [rows, vocab]."""
    for i, seq in enumerate(seqs):
        if seq.params.logprobs is not None:
            seq.logprobs.extend(token_logprobs(logits[i:i + 1], [tokens[i]], seq.params.logprobs))


def split_prompt_rows(logits: torch.Tensor, seqs: list, record: bool) -> tuple[torch.Tensor, list]:
    """A prefill step's logits (model_runner.run: every computed row of a sequence that wants_prompt_logprobs)
    as one row per sequence, the row that picks its next token; and the prompt logprobs its rows give, as
    (sequence, prompt tokens now counted, TokenLogprob entries: only where `record`) for `add_prompt_logprobs` to
    apply once the step has succeeded. Row j of a chunk [start, end) gives the logprob of prompt token start+j+1."""
    if not any(seq.wants_prompt_logprobs for seq in seqs):
        return logits, []
    last, pending, offset = [], [], 0
    for seq in seqs:
        start, end = seq.prefill_start, seq.prefill_end
        rows = end - start if seq.wants_prompt_logprobs else 1
        last.append(offset + rows - 1)
        if seq.wants_prompt_logprobs:
            # Prompt positions counted .. counted_now-1 are new (a preempted prompt computed again has some). A
            # recompute's chunk may end before the positions already counted (its budget is the step's, not the
            # first pass's): the count never goes back, or the next chunk would add those positions again.
            counted = seq.prompt_logprobs_counted
            counted_now = max(counted, min(end + 1, seq.num_prompt_tokens))
            entries = []
            if record:
                entries = [None] if counted == 0 else []
                first = max(counted, 1)
                if first < counted_now:
                    entries += token_logprobs(logits[offset + first - 1 - start:offset + counted_now - 1 - start],
                                              seq.token_ids[first:counted_now], seq.params.prompt_logprobs)
            pending.append((seq, counted_now, entries))
        offset += rows
    return logits[last], pending


def add_prompt_logprobs(pending: list) -> None:
    for seq, counted_now, entries in pending:
        seq.prompt_logprobs_counted = counted_now
        seq.prompt_logprobs.extend(entries)


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
