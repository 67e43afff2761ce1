"""Speculative decoding by prompt lookup (n-gram drafts, vLLM's "ngram" method): a greedy sequence whose last few
tokens appeared earlier in its prompt or answer guesses that what followed them then follows now. One decode step
computes its last token and the guessed ones as rows of its batch (model_runner.run: the weights stream once for
all of them, which is what a decode step on a CPU or at a small batch waits on; the decode attention stores every
row's K/V before any row attends, so a guess sees the rows before it), and keeps the guesses up to the first the
model disagrees with, plus the model's own token after them. The rows go through the decode kernels a plain step
uses, so the tokens are the plain engine's; a step gives 1 to num_speculative_tokens + 1 of them.

Only greedy sequences with nothing shaping their logits are drafted for (a sampled one would need rejection
sampling to keep its distribution); they share steps with the others, which draw one token as usual.
"""
from __future__ import annotations

import numpy as np
import torch


def propose(token_ids: list, count: int, lookup_max: int) -> list:
    """Up to `count` tokens that followed the latest earlier occurrence of the sequence's last n tokens, the
    longest n from lookup_max down to 1 that occurs; [] where none does."""
    if count < 1 or len(token_ids) < 2:
        return []
    ids = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(lookup_max, len(ids) - 1), 0, -1):
        # windows of n tokens that end before the last token (the suffix itself is not an earlier occurrence)
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        found = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if len(found):
            start = int(found[-1]) + n
            return token_ids[start:start + count]
    return []


def drafting(seq) -> bool:
    """Whether a sequence may be drafted for: greedy, nothing shaping its logits, no logprobs asked."""
    p = seq.params
    return p.greedy and not p.shapes_logits and p.logprobs is None


def _row_offsets(seqs: list) -> list:
    """Where each sequence's rows begin in a drafted step's logits (1 + its guesses rows, one for the others), and
    the end."""
    offsets = [0]
    for seq in seqs:
        offsets.append(offsets[-1] + 1 + len(seq.draft_tokens))
    return offsets


def first_rows(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """Each sequence's row after its last token [len(seqs), vocab]: what an undrafted decode step's logits are."""
    return logits[_row_offsets(seqs)[:-1]]


def draw(logits: torch.Tensor, seqs: list, sample) -> list:
    """A drafted decode step's tokens: `sample` (the sampler, on first_rows) gives every sequence its token, and a
    drafted sequence keeps its agreed guesses and the token after them (a list of its tokens, in order).
    logits: model_runner's, 1 + len(draft_tokens) rows for a drafted sequence."""
    offsets = _row_offsets(seqs)
    tokens = sample(logits[offsets[:-1]], seqs)
    for i, seq in enumerate(seqs):
        if seq.draft_tokens:
            tokens[i] = accepted_tokens(logits[offsets[i]:offsets[i + 1]], tokens[i], seq.draft_tokens)
    return tokens


def accepted_tokens(rows: torch.Tensor, first: int, drafts: list) -> list:
    """A drafted sequence's tokens for this step: `first` (the token its first row gives), then each draft the
    model agrees with (row i's greedy token is draft i), then the model's token after the last agreed one.
    rows: its logits [1 + len(drafts), vocab]."""
    tokens = [first]
    if drafts:
        greedy = rows[1:].argmax(-1).tolist()
        for i, draft in enumerate(drafts):
            if tokens[-1] != draft:
                break
            tokens.append(greedy[i])
    return tokens
