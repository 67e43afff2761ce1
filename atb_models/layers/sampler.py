"""Next-token choice for a batch of rows, each with its own SamplingParams.

The order follows transformers' logits processors: OpenAI's logit_bias (added to the raw logits), repetition
penalty, presence and frequency penalties, then temperature, the mask of the tokens ruled out (by a structured
output or allowed_token_ids, eos and stop tokens before min_tokens, bad words), then top-k, top-p, min-p, then a
draw (argmax when the temperature is greedy: SamplingParams.greedy). The repetition penalty covers the prompt and
the output, as in transformers; OpenAI's presence and frequency penalties the output only (as OpenAI and vLLM
define them).
"""
import torch


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list, penalty: float) -> torch.Tensor:
    seen = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    scores = logits.index_select(0, seen)
    logits.index_copy_(0, seen, torch.where(scores < 0, scores * penalty, scores / penalty))
    return _within_range(logits)


def apply_logit_bias(logits: torch.Tensor, bias: tuple) -> torch.Tensor:
    """SamplingParams.logit_bias's (token id, bias) pairs added to `logits` (in place)."""
    tokens, values = zip(*bias)
    logits.index_add_(0, torch.tensor(tokens, device=logits.device),
                      torch.tensor(values, dtype=logits.dtype, device=logits.device))
    return _within_range(logits)


def apply_presence_frequency_penalties(logits: torch.Tensor, completion_ids: list, presence: float,
                                       frequency: float) -> torch.Tensor:
    """Each generated token's logit less `presence` once and `frequency` times its count (in place)."""
    if completion_ids:
        seen, counts = torch.tensor(completion_ids, dtype=torch.long).unique(return_counts=True)
        logits.index_add_(0, seen.to(logits.device), -(presence + frequency * counts.to(logits.dtype)))
    return _within_range(logits)


def _within_range(logits: torch.Tensor) -> torch.Tensor:
    """An extreme penalty or temperature can scale finite logits past float32's range; held at the largest finite
    values (in place) they keep their order, where an inf would turn the softmax into nan. A nan stays a nan."""
    finfo = torch.finfo(logits.dtype)
    return logits.clamp_(finfo.min, finfo.max)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best token always stays.
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drops the tokens less likely than min_p times the most likely one (the best always stays)."""
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def allowed_tokens(seq, vocab_size: int, eos_token_ids) -> torch.Tensor | None:
    """A bool mask of the tokens the sequence may draw now, None for all: its structured output's (or its
    allowed_token_ids), less the eos and stop tokens while the answer is shorter than min_tokens and the token that
    would complete a bad word, unless that leaves nothing (a complete constraint must end)."""
    p = seq.params
    ruled_out = _bad_word_ends(seq)
    if len(seq.completion_token_ids) < p.min_tokens:
        ruled_out += list(eos_token_ids) + list(p.stop_token_ids)
    if seq.matcher is None and p.allowed_token_ids is None and not ruled_out:
        return None
    if seq.matcher is not None:
        allowed = seq.matcher.allowed(vocab_size)
    elif p.allowed_token_ids is not None:
        if seq.allowed_mask is None:  # (made once: a list as long as the vocabulary is slow to scatter each step)
            seq.allowed_mask = torch.zeros(vocab_size, dtype=torch.bool)
            seq.allowed_mask[list(p.allowed_token_ids)] = True
        allowed = seq.allowed_mask
    else:
        allowed = torch.ones(vocab_size, dtype=torch.bool)
    if ruled_out:
        narrowed = allowed.clone()
        narrowed[ruled_out] = False
        if narrowed.any():
            allowed = narrowed
    return allowed


def _bad_word_ends(seq) -> list:
    """The last token of each bad word (a token id sequence) whose other tokens end the answer so far."""
    completion = seq.completion_token_ids
    ends = []
    for word in seq.bad_words:
        before = len(word) - 1
        if before == 0 or (len(completion) >= before and tuple(completion[-before:]) == word[:-1]):
            ends.append(word[-1])
    return ends


def sample(logits: torch.Tensor, seqs: list, eos_token_ids=()) -> list:
    """logits: [rows, vocab] float32, one row per sequence. Returns one token id per sequence; `eos_token_ids` are
    held back from a sequence shorter than its min_tokens."""
    tokens = []
    plain_greedy = all(s.params.greedy and not s.params.shapes_logits for s in seqs)
    if plain_greedy:
        return logits.argmax(-1).tolist()
    # Per-row work on the host: small, and seeded generators live there.
    for row, seq in zip(logits.cpu(), seqs):
        p = seq.params
        if p.shapes_logits:
            row = row.clone()  # the steps below work in place; the caller's logits still give the logprobs
        if p.logit_bias:
            apply_logit_bias(row, p.logit_bias)
        if p.repetition_penalty != 1.0:
            apply_repetition_penalty(row, seq.token_ids, p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            apply_presence_frequency_penalties(row, seq.completion_token_ids, p.presence_penalty,
                                               p.frequency_penalty)
        allowed = allowed_tokens(seq, row.shape[-1], eos_token_ids)
        if not p.greedy:
            row = _within_range(row / p.temperature)
        if allowed is not None:
            # Last: no penalty, bias or temperature may bring back a token ruled out. (Before the clamp to float32's
            # range a masked -inf would turn finite, tied with the allowed tokens an extreme penalty held there.)
            row.masked_fill_(~allowed.to(row.device), float("-inf"))
        if p.greedy:
            tokens.append(int(row.argmax()))
            continue
        row = top_k_top_p_filter(row, p.top_k, p.top_p)
        if p.min_p:
            row = min_p_filter(row, p.min_p)
        probs = row.softmax(-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
    return tokens
