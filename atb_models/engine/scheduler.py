"""Who runs in the next step.

Step-level continuous batching: a step is either a prefill of newly admitted sequences or one decode step for
every running sequence. Waiting sequences are admitted while `max_batch_size`, the prefill token budget (the tokens
to compute: a prefix found in the cache is not computed again, engine.block_manager) and free KV blocks allow;
when a decode step finds no block for a sequence, the youngest running sequence is preempted (its blocks freed)
and recomputed later from its prompt and the tokens it already generated.
"""
from collections import deque

from atb_models.engine.block_manager import BlockManager
from atb_models.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_tokens: int, eos_token_ids):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque = deque()
        self.running: deque = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self):
        """Returns (sequences, is_prefill)."""
        admitted, tokens = [], 0
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            seq = self.waiting[0]
            # The budget counts the tokens a prefill computes: a cached prefix costs nothing. A sequence alone may
            # exceed it (a preempted one recomputing its output), else it could never run.
            to_compute = seq.num_tokens - len(self.block_manager.cached_prefix(seq)) * self.block_manager.block_size
            if admitted and tokens + to_compute > self.max_prefill_tokens:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
            tokens += seq.num_tokens - seq.num_cached_tokens
        if admitted:
            self.running.extend(admitted)
            return admitted, True

        scheduled = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.append(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled, False

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

    def preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.block_manager.free(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence, waiting or running, between steps: it leaves its queue and its KV blocks are free at
        once. The one way a sequence ends: an eos token or max_tokens (finish_step), a stop string, an abort."""
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def finish_step(self, seqs: list, token_ids: list) -> list:
        """Record each sequence's new token; return the sequences that finished (their blocks are freed)."""
        finished = []
        for seq, token in zip(seqs, token_ids):
            seq.append_token(token)
            self.block_manager.register_written(seq)  # blocks this step completed join the prefix cache
            if not seq.params.ignore_eos and token in self.eos_token_ids:
                self.finish(seq, "stop")
            elif len(seq.completion_token_ids) >= seq.max_tokens:
                self.finish(seq, "length")
            else:
                continue
            finished.append(seq)
        return finished
