"""Beam search: the `beam_width` likeliest answers to a prompt by the sum of their tokens' log-probabilities
(transformers' `num_beams`, vLLM's `LLM.beam_search`, MindIE's `--num_beams`).

The rule is transformers' `generate(num_beams=...)`, the kit's reference (tests/test_beam_search.py compares them
token for token). Each step scores every live beam's next tokens (the beam's sum plus the token's log-softmax, in
float32) and takes the best max(2, 1 + number of eos ids) x beam_width of them in order: an eos among the first
beam_width ends a hypothesis of the beam before it (scored by its sum over its length, eos included, to the power
length_penalty); any other continues, until beam_width beams continue. A prompt is done once beam_width hypotheses
are kept and none of its live beams can beat the worst of them (`early_stopping`: False, transformers' estimate from
the current length; True, at once; "never", not before a beam could no longer win), or at max_tokens, where the
live beams are hypotheses too. The hypotheses come back best first.

A beam is an engine Sequence. Beams share KV blocks by reference count: a beam with several continuations hands
each a copy of its block table (engine.block_manager.fork), and the one block they would write apart, the one
holding their new token's slot, is copied for each of them but the last before the decode step writes it
(BlockManager.own_block_for_newest, ModelRunner.copy_blocks). Prompts are searched together: each step is one
prefill of the prompts admitted (while the KV cache can hold every beam they may grow to) and one decode step of
every live beam of every prompt. On a chunked-prefill engine a prompt longer than max_prefill_tokens is admitted
alone and prefilled a chunk at a time before its beams start (the running beams wait those chunks out).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from atb_models.engine.llm import RequestOutput, StepRecord
from atb_models.engine.sampling_params import BeamSearchParams, SamplingParams
from atb_models.engine.sequence import Sequence, SequenceStatus
from atb_models.errors import UserError


@dataclass
class BeamSequence:
    """One answer of a beam search."""

    token_ids: list            # the generated tokens, the eos that ended it included
    text: str                  # their text, without the eos
    cumulative_logprob: float  # the sum of their log-probabilities
    score: float               # cumulative_logprob / len(token_ids) ** length_penalty: the answers' order
    finish_reason: str         # "stop" (an eos) or "length" (max_tokens)


@dataclass
class BeamSearchOutput:
    """A prompt's answers, best first; `error` where the request could not run (the others are unaffected). The
    best answer's text and tokens are also `text` and `token_ids`, as a RequestOutput's are; `finish_reason` is the
    best answer's, "abort" (LLM.abort) or "error", None while the search runs."""

    request_id: int
    prompt: str
    sequences: list = field(default_factory=list)
    prompt_token_count: int = 0
    error: Optional[str] = None
    finish_reason: Optional[str] = "error"
    # The prefix cache's part (as RequestOutput's): prompt tokens whose K/V it held, media whose vision-tower run
    # was skipped.
    cached_prompt_tokens: int = 0
    cached_visual_items: int = 0

    @property
    def text(self) -> str:
        return self.sequences[0].text if self.sequences else ""

    @property
    def token_ids(self) -> list:
        return self.sequences[0].token_ids if self.sequences else []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def choices(self) -> list:
        """A RequestOutput for each answer, best first (the server's choices): its text, tokens and finish reason,
        the prompt's token count and cache counts."""
        return [RequestOutput(self.request_id, self.prompt, s.text, s.token_ids, self.prompt_token_count,
                              s.finish_reason, cached_prompt_tokens=self.cached_prompt_tokens,
                              cached_visual_items=self.cached_visual_items) for s in self.sequences]


class Hypotheses:
    """A prompt's best finished answers so far, at most `width` (transformers' BeamHypotheses, rule for rule)."""

    def __init__(self, params: BeamSearchParams, max_tokens: int):
        self.params, self.max_tokens = params, max_tokens
        self.kept: list = []  # (score, token ids, sum of logprobs, finish reason), in the order they came
        self.worst = 1e9

    def add(self, tokens: list, logprob_sum: float, finish_reason: str) -> None:
        score = logprob_sum / len(tokens) ** self.params.length_penalty
        if len(self.kept) < self.params.beam_width or score > self.worst:
            self.kept.append((score, tokens, logprob_sum, finish_reason))
            if len(self.kept) > self.params.beam_width:
                ranked = sorted((kept[0], index) for index, kept in enumerate(self.kept))
                del self.kept[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def done(self, best_logprob_sum: float, length: int) -> bool:
        """Whether no live beam, the best of which has `best_logprob_sum` over `length` tokens, can beat them."""
        if len(self.kept) < self.params.beam_width:
            return False
        # One beam: transformers' generate(num_beams=1) is greedy search, which early_stopping and length_penalty
        # do not touch: its answer ends at the eos that tops a step ("never" would look past it).
        if self.params.early_stopping is True or self.params.beam_width == 1:
            return True
        penalty = self.params.length_penalty
        if self.params.early_stopping == "never" and penalty > 0:
            length = self.max_tokens  # the longest a beam can grow: the least its score can be divided by
        return self.worst >= best_logprob_sum / length ** penalty

    def best_first(self) -> list:
        return sorted(self.kept, key=lambda kept: kept[0])[::-1]  # (ties: the later first, as transformers')


@dataclass
class Beam:
    seq: Sequence
    logprob_sum: float  # a float32 value, summed in float32 as transformers does


@dataclass
class Search:
    """One prompt's search."""

    output: BeamSearchOutput
    params: BeamSearchParams
    max_tokens: int
    eos: frozenset
    beams: list
    hypotheses: Hypotheses
    blocks: int  # the KV blocks its beams may hold at most (admission counts them)
    arrival: int  # its prompt's Sequence.arrival: it and the scheduler's prompts start first come, first served

    @property
    def candidates(self) -> int:
        return max(2, 1 + len(self.eos)) * self.params.beam_width


class BeamSearch:
    """An engine's beam searches over its parts (preprocessing, block manager, model runner): each added (`add`),
    advanced a round at a time (`round`: the prefill of the prompts that start, one decode step of every live beam),
    ended when done or aborted. LLM.beam_search runs a list of them to their end; LLM.step runs rounds between the
    scheduler's steps for the searches add_request takes. The KV blocks every running search's beams may grow to
    are promised to it (BlockManager.promised), so the scheduler's sequences never take them."""

    def __init__(self, llm):
        self.llm, self.block_manager, self.runner = llm, llm.block_manager, llm.runner
        self.next_seq_id = 0
        self.waiting: deque = deque()  # Searches preprocessed, waiting for room
        self.running: list = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def holds(self, seq: Sequence) -> bool:
        """Whether the scheduler's waiting `seq` waits behind the first waiting search, which came before it and
        waits for room other than the batch's rows (the blocks its beams may take): first come, first served, else
        prompts that keep coming take the blocks as they free and the search never starts."""
        if not self.waiting or self.waiting[0].arrival > seq.arrival:
            return False
        return not self._waits_for_rows(self.waiting[0], sum(s.params.beam_width for s in self.running))

    def _waits_for_rows(self, search: Search, rows: int) -> bool:
        return rows > 0 and rows + search.params.beam_width > self.llm.max_batch_size

    def _behind_a_prompt(self, search: Search) -> bool:
        """Whether the scheduler's first waiting prompt came before `search` and waits for blocks (holds()'s
        converse)."""
        scheduler = self.llm.scheduler
        return bool(scheduler.waiting) and scheduler.waiting[0].arrival < search.arrival and (
            len(scheduler.running) < scheduler.max_batch_size)

    def add(self, request_id: int, prompt, params: BeamSearchParams) -> Search:
        """Queue a search of a preprocessed prompt; a request that cannot run raises UserError, leaving nothing."""
        output = BeamSearchOutput(request_id, prompt.text, finish_reason=None)
        search = self._search(output, prompt, params)
        self.waiting.append(search)
        return search

    def abort(self, search: Search) -> BeamSearchOutput:
        if search in self.waiting:
            self.waiting.remove(search)
        if search in self.running:
            self.running.remove(search)
        self._release_all(search)
        search.output.finish_reason = "abort"
        self._promise()
        return search.output

    def reset(self) -> None:
        """Every search dropped (the engine frees every block wholesale: Scheduler.abort_all)."""
        self.waiting.clear()
        self.running.clear()

    def round(self) -> list:
        """One round: the prompts that can start prefilled, then one decode step of every live beam; the outputs
        of the searches that ended in it."""
        ended = []
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        live = [s for s in self.running if s.beams]
        if live:
            self._decode(live)
        for search in self.running:
            if not search.beams:
                ended.append(search.output)
        self.running = [s for s in self.running if s.beams]
        self._promise()
        return ended

    def _promise(self) -> None:
        """The blocks the running searches' beams may still take, promised to them (the prompt's and every beam's
        held count once)."""
        self.block_manager.promised = sum(
            max(0, s.blocks - len({block for beam in s.beams for block in beam.seq.block_table}))
            for s in self.running)

    # ------------------------------------------------------------------------------------------ admission
    def _admit(self) -> list:
        """The waiting prompts that start now, in order: while a decode step's rows (max_batch_size, or at least
        one prompt's beams), the prefill budget and the free KV blocks (for every beam they may grow to) allow."""
        llm, bm = self.llm, self.block_manager
        rows = sum(s.params.beam_width for s in self.running)
        budget, admitted = llm.max_prefill_tokens, []
        while self.waiting:
            search = self.waiting[0]
            tokens = search.beams[0].seq.num_tokens
            if (search.blocks > bm.num_free_blocks or self._waits_for_rows(search, rows)
                    or self._behind_a_prompt(search)):
                break
            if admitted and tokens > budget:
                break
            self.waiting.popleft()
            # (chunked prefill: a prompt longer than the budget, admitted alone, computes a chunk a step)
            bm.allocate(search.beams[0].seq, max_compute=budget if llm.enable_chunked_prefill else None)
            search.beams[0].seq.status = SequenceStatus.RUNNING
            self.running.append(search)
            self._promise()  # (before the next prompt's turn: it sees the blocks this one may take as taken)
            admitted.append(search)
            rows, budget = rows + search.params.beam_width, budget - tokens
        return admitted

    def _search(self, output: BeamSearchOutput, prompt, params: BeamSearchParams) -> Search:
        llm = self.llm
        max_tokens = params.max_tokens or llm.max_output_length
        seq = llm._make_sequence(self._seq_id(), prompt, SamplingParams(max_tokens=max_tokens), output)
        # The prompt's blocks, shared by every beam, and each beam's own: its generated tokens' and a copy of the
        # prompt's last block, which they all write apart.
        bm = self.block_manager
        blocks = bm.blocks_for(seq.num_tokens) + params.beam_width * (bm.blocks_for(max_tokens) + 1)
        if blocks > bm.num_blocks:
            raise UserError(f"beam search of width {params.beam_width} over {seq.num_tokens} prompt tokens and "
                            f"{max_tokens} new ones needs up to {blocks} KV blocks; the cache has {bm.num_blocks} (an "
                            f"engine of max_batch_size {params.beam_width} holds them)")
        eos = frozenset() if params.ignore_eos else frozenset(llm.model_config.eos_token_ids)
        return Search(output, params, max_tokens, eos, [Beam(seq, 0.0)], Hypotheses(params, max_tokens), blocks,
                      seq.arrival)

    def _seq_id(self) -> int:
        self.next_seq_id += 1
        return self.next_seq_id

    # ------------------------------------------------------------------------------------------ steps
    def _prefill(self, searches: list) -> None:
        seqs = [s.beams[0].seq for s in searches]
        logits = self._timed(seqs, True, sum(seq.prefill_end - seq.prefill_start for seq in seqs))
        if seqs[0].prefill_end < seqs[0].num_tokens:  # a chunk of a prompt prefilled alone (_admit): the rest
            [seq] = seqs
            while seq.prefill_end < seq.num_tokens:
                seq.prefill_start = seq.prefill_end
                seq.prefill_end = min(seq.num_tokens, seq.prefill_start + self.llm.max_prefill_tokens)
                self.block_manager.register_prefill(seq)
                logits = self._timed(seqs, True, seq.prefill_end - seq.prefill_start)
        for search, seq in zip(searches, seqs):
            seq.prefill_start = seq.prefill_end = None
            seq.prompt.visuals = []  # (their pixels: every later step decodes)
            search.output.cached_prompt_tokens = min(seq.num_cached_tokens, seq.num_prompt_tokens)
            search.output.cached_visual_items = seq.cached_visual_items
        self._advance(searches, logits)

    def _decode(self, searches: list) -> None:
        seqs = [beam.seq for s in searches for beam in s.beams]
        copies = []
        for seq in seqs:
            copy = self.block_manager.own_block_for_newest(seq)
            if copy is not None:
                copies.append(copy)
        if copies:
            self.runner.copy_blocks(copies)
        self._advance(searches, self._timed(seqs, False, len(seqs)))

    def _timed(self, seqs: list, is_prefill: bool, num_tokens: int) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.runner.run(seqs, is_prefill)
        self.llm.plan.synchronize()
        if self.llm._generating.locked():  # (LLM.beam_search's steps alone, as generate()'s: a server's would pile up)
            self.llm.step_records.append(StepRecord(is_prefill, len(seqs), num_tokens, time.perf_counter() - start))
        return logits

    def _advance(self, searches: list, logits: torch.Tensor) -> None:
        """Each search's step from its beams' logits rows (in order): rank 0 ranks the candidates, every rank
        applies them alike."""
        ranked = self.llm._on_rank0(lambda: _candidates(logits, searches))
        self.llm.tokens_generated += sum(len(search.beams) for search in searches)  # (a token each beam's row)
        for search, (scores, parents, tokens) in zip(searches, ranked):
            self._step(search, scores, parents, tokens)

    def _step(self, search: Search, scores: list, parents: list, tokens: list) -> None:
        width, generated = search.params.beam_width, len(search.beams[0].seq.completion_token_ids)
        chosen = []  # (parent beam, token, logprob sum)
        for rank, (score, parent, token) in enumerate(zip(scores, parents, tokens)):
            beam = search.beams[parent]
            if token in search.eos:
                if rank < width:  # (an eos below the beams' ranks ends nothing)
                    search.hypotheses.add(beam.seq.completion_token_ids + [token], score, "stop")
            else:
                chosen.append((beam, token, score))
            if len(chosen) == width:
                break
        if search.hypotheses.done(scores[0], generated + 1):
            return self._finish(search)
        search.beams = self._continue(search.beams, chosen)
        if generated + 1 == search.max_tokens:
            for beam in search.beams:
                search.hypotheses.add(beam.seq.completion_token_ids, beam.logprob_sum, "length")
            self._finish(search)

    def _continue(self, beams: list, chosen: list) -> list:
        """The beams that continue, in the order chosen: a beam's first continuation goes on in its sequence,
        the others in forks of it made before its new token; a beam without one lets its blocks go."""
        children: dict = {}  # a beam's continuations, by their places in `chosen`
        for place, (beam, _, _) in enumerate(chosen):
            children.setdefault(id(beam), []).append(place)
        seqs = [None] * len(chosen)
        for beam in beams:
            places = children.get(id(beam))
            if places is None:
                self._release(beam.seq)
                continue
            for place in places[1:]:
                seqs[place] = self._fork(beam.seq)
            seqs[places[0]] = beam.seq
        for seq, (_, token, _) in zip(seqs, chosen):
            seq.append_token(token)
        return [Beam(seq, score) for seq, (_, _, score) in zip(seqs, chosen)]

    def _fork(self, parent: Sequence) -> Sequence:
        child = Sequence(self._seq_id(), parent.prompt, parent.params, parent.max_tokens)
        child.token_ids = list(parent.token_ids)
        child.num_prompt_tokens, child.decode_from = parent.num_prompt_tokens, parent.decode_from
        child.prefill_start = child.prefill_end = None
        child.status = SequenceStatus.RUNNING
        self.block_manager.fork(parent, child)
        return child

    def _release(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)

    def _release_all(self, search: Search) -> None:
        for beam in search.beams:
            self._release(beam.seq)
        search.beams = []

    def _finish(self, search: Search) -> None:
        self._release_all(search)
        decode = self.llm._decoders[True]
        search.output.sequences = [
            BeamSequence(tokens, decode(tokens[:-1] if reason == "stop" else tokens), logprob_sum, score, reason)
            for score, tokens, logprob_sum, reason in search.hypotheses.best_first()]
        search.output.finish_reason = search.output.sequences[0].finish_reason


def _candidates(logits: torch.Tensor, searches: list) -> list:
    """Per search, its best candidates in order as lists (scores, parent beams, tokens): each live beam's logprob
    sum plus its next tokens' log-softmax, all in float32 (transformers' arithmetic), ranked over all its beams."""
    ranked, row = [], 0
    vocab = logits.shape[-1]
    for search in searches:
        count = len(search.beams)
        sums = torch.tensor([beam.logprob_sum for beam in search.beams], dtype=torch.float32, device=logits.device)
        scores = torch.log_softmax(logits[row:row + count].float(), dim=-1) + sums[:, None]
        row += count
        best = scores.view(-1).topk(min(search.candidates, scores.numel()))
        ranked.append((best.values.tolist(), (best.indices // vocab).tolist(), (best.indices % vocab).tolist()))
    return ranked
