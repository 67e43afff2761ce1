"""Who runs in the next step.

Step-level continuous batching: a step is either a prefill of newly admitted sequences or one decode step for
every running sequence. Waiting sequences are admitted while `max_batch_size`, the prefill token budget (the tokens
to compute: a prefix found in the cache is not computed again, engine.block_manager) and free KV blocks allow;
when a decode step finds no block for a sequence, the youngest running sequence is preempted (its blocks freed)
and recomputed later from its prompt and the tokens it already generated.

Chunked prefill (`chunked_prefill`): a prompt longer than the budget is computed a chunk of `max_prefill_tokens`
a step, and while sequences are decoding, chunk steps and decode steps alternate, so a long prompt (a video) delays
the running answers by one chunk at a time instead of its whole prefill. A sequence holds all its prompt's blocks
from admission on; only its last chunk draws a token.

Speculative decoding (`num_speculative_tokens`): a decode step gives each greedy sequence the tokens that prompt
lookup guesses (engine.speculative), with blocks for them where free ones allow; the step checks them all.
"""
from collections import deque

from atb_models.engine import speculative
from atb_models.engine.block_manager import BlockManager
from atb_models.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_tokens: int, eos_token_ids,
                 chunked_prefill: bool = False, num_speculative_tokens: int = 0, prompt_lookup_max: int = 3,
                 draft_rows: int | None = None, tokenizer_eos: int | None = None):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        # The tokenizer's own eos ends an answer with no stop_reason; generation_config.json's other eos ids are
        # stop tokens to vLLM, which names them as the stop_reason (<|endoftext|> after an Instruct model's answer).
        self.tokenizer_eos = tokenizer_eos
        self.chunked_prefill = chunked_prefill
        self.num_speculative_tokens, self.prompt_lookup_max = num_speculative_tokens, prompt_lookup_max
        # A decode step's rows (its sequences and their guesses) at most, where guesses are free only that far (the
        # linear kernel's rows_per_pass); None: num_speculative_tokens a sequence, whatever the batch.
        self.draft_rows = draft_rows
        self.waiting: deque = deque()
        self.running: deque = deque()
        self.num_preemptions = 0
        self._last_was_prefill = False
        # admission_held(seq): whether a waiting sequence waits behind a beam search that came first (LLM sets it to
        # BeamSearch.holds), else a steady stream of prompts could keep the blocks that search waits for forever.
        self.admission_held = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self):
        """Returns (sequences, is_prefill). A prefill step computes each sequence's [prefill_start, prefill_end)."""
        # Prompts computed in part (chunked; unchunked, a prefill always computes its prompt whole)
        continuing = [seq for seq in self.running if seq.prefill_end is not None] if self.chunked_prefill else []
        if continuing and self._last_was_prefill and len(continuing) < len(self.running):
            scheduled = self._decode_step()
            if scheduled:
                return scheduled, False
        chosen, budget = [], self.max_prefill_tokens
        for seq in continuing:
            if budget <= 0:
                break
            seq.prefill_end = min(seq.num_tokens, seq.prefill_start + budget)
            self.block_manager.register_prefill(seq)
            budget -= seq.prefill_end - seq.prefill_start
            chosen.append(seq)
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            seq = self.waiting[0]
            # The budget counts the tokens a prefill computes: a cached prefix costs nothing. Unchunked, a sequence
            # alone may exceed it (a preempted one recomputing its output), else it could never run.
            to_compute = seq.num_tokens - len(self.block_manager.cached_prefix(seq)) * self.block_manager.block_size
            full = budget <= 0 if self.chunked_prefill else bool(admitted) and to_compute > budget
            if full:
                break
            if not self.block_manager.can_allocate(seq):
                break
            if self.admission_held is not None and self.admission_held(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, max_compute=budget if self.chunked_prefill else None)
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
            budget -= seq.prefill_end - seq.prefill_start
        if chosen or admitted:
            self.running.extend(admitted)
            self._last_was_prefill = True
            return chosen + admitted, True
        return self._decode_step(), False

    def _decode_step(self) -> list:
        """The running sequences whose prompt is computed, each given room for its next token; sequences are
        preempted, youngest first, where no block is left."""
        self._last_was_prefill = False
        scheduled, kept = [], []
        while self.running:
            seq = self.running.popleft()
            if self.chunked_prefill and seq.prefill_end is not None:  # its prompt's next chunk comes first
                kept.append(seq)
                continue
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.append(seq)
                scheduled.append(seq)
                kept.append(seq)
        self.running.extend(kept)
        spare = None if self.draft_rows is None else self.draft_rows - len(scheduled)
        for seq in scheduled:
            seq.draft_tokens = self._drafts(seq, spare) if self.num_speculative_tokens else []
            if spare is not None:
                spare -= len(seq.draft_tokens)
        return scheduled

    def _drafts(self, seq: Sequence, spare: int | None) -> list:
        """The tokens guessed for a sequence's decode step: as many as prompt lookup finds, at most those that its
        max_tokens leave room for past the step's own token, the step's `spare` rows (None: no bound) and those
        whose K/V free blocks can hold."""
        if not speculative.drafting(seq) or (spare is not None and spare <= 0):
            return []
        room = min(self.num_speculative_tokens, seq.max_tokens - len(seq.completion_token_ids) - 1,
                   self.num_speculative_tokens if spare is None else spare)
        drafts = speculative.propose(seq.token_ids, room, self.prompt_lookup_max)
        while drafts and not self.block_manager.reserve(seq, seq.num_tokens + len(drafts)):
            drafts.pop()
        return drafts

    def prefill_done(self, seqs: list) -> list:
        """After a prefill step: the sequences whose prompt is now all computed (each draws its first token); the
        others computed a chunk and keep the rest for a later step."""
        done = []
        for seq in seqs:
            if seq.prefill_end < seq.num_tokens:
                seq.prefill_start, seq.prefill_end = seq.prefill_end, seq.num_tokens
            else:
                done.append(seq)  # (finish_step marks its prompt computed)
        return done

    def abort_all(self) -> None:
        """Drop every sequence, waiting or running, and free every KV block: what a generate() call that ended by
        an exception leaves behind. The blocks are reset wholesale because a step cut short can hold a sequence
        that is in neither queue (popped for scheduling, not yet put back)."""
        for seq in (*self.waiting, *self.running):
            seq.status = SequenceStatus.FINISHED
            seq.block_table = []
        self.waiting.clear()
        self.running.clear()
        self.block_manager.reset()

    def undo_admission(self, seqs: list) -> None:
        """The sequences of a prefill step that did not complete wait again, at the head of the queue in their
        order, holding no block; the blocks their admission added to the prefix cache leave it (their K/V may be
        unwritten), those found there before stay."""
        for seq in reversed(seqs):
            self.block_manager.forget_uncomputed(seq)
            self.running.remove(seq)
            self.preempt(seq)
            self.num_preemptions -= 1  # not a preemption: nothing ran

    def preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.block_manager.free(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence, waiting or running, between steps: it leaves its queue and its KV blocks are free at
        once. The one way a sequence ends: an eos or stop token, a complete structured output or max_tokens
        (finish_step), a stop string, an abort."""
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def finish_step(self, seqs: list, token_ids: list) -> list:
        """Record each sequence's new token (a list of tokens: a drafted sequence's, in order); return the
        sequences that finished (their blocks are freed)."""
        finished = []
        for seq, tokens in zip(seqs, token_ids):
            if seq.prefill_end is not None:  # a prefill step: its K/V up to here are the prefill's
                seq.decode_from = seq.prefill_end
            seq.prefill_start = seq.prefill_end = None  # its prompt is computed: it drew a token
            drafted, seq.draft_tokens = bool(seq.draft_tokens), []
            for token in tokens if isinstance(tokens, list) else [tokens]:
                seq.append_token(token)
                self.block_manager.register_written(seq)  # blocks this step completed join the prefix cache
                if not seq.params.ignore_eos and token in self.eos_token_ids:
                    if self.tokenizer_eos is not None and token != self.tokenizer_eos:
                        seq.stop_reason = token
                    seq.ended_by_token = True
                    self.finish(seq, "stop")
                elif token in seq.params.stop_token_ids:
                    seq.stop_reason, seq.ended_by_token = token, True
                    self.finish(seq, "stop")
                elif seq.matcher is not None and seq.matcher.advance(token):  # its structured output is complete
                    self.finish(seq, "stop")
                elif len(seq.completion_token_ids) >= seq.max_tokens:
                    self.finish(seq, "length")
                else:
                    continue
                finished.append(seq)
                break
            else:
                if drafted:  # the blocks of the guesses it did not keep
                    self.block_manager.release_unused(seq)
        return finished
