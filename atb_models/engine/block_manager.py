"""KV-cache blocks: which are free, which belong to whom, and which hold a prefix another request can reuse.

Prefix caching: a full block whose K/V are all written is identified by a hash chain over the tokens up to its end
(`block_hashes`): its parent block's hash, its token ids and, for image and video placeholder tokens, the content
hash of their medium and where in it they lie. Two different images never share a block; the same image at the
same place after the same tokens always does, with the same M-RoPE positions by construction (positions are a
function of the tokens and grids before them).

A block is held by a count of sequences. When the count drops to zero a hashed block stays cached, reusable until
its memory is needed: allocation takes never-hashed free blocks first, then evicts cached ones least recently used
first. A new sequence reuses the longest run of its leading blocks found in the cache and computes only the rest
(at least its last token, whose logits it needs). Every decision is a function of the sequences' tokens and media,
so every rank of a tensor-parallel group decides alike.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

from atb_models.engine.sequence import Sequence
from atb_models.layers.sharding import ceil_div


def block_hashes(seq: Sequence, block_size: int, count: int) -> list[str]:
    """The hash chain of the sequence's first `count` blocks (each full: count * block_size <= its tokens), made
    once and extended as the sequence grows (seq.block_hash_cache)."""
    known = seq.block_hash_cache
    visuals = seq.visual_spans
    while len(known) < count:
        index = len(known)
        begin, end = index * block_size, (index + 1) * block_size
        digest = hashlib.blake2b(digest_size=16)
        digest.update((known[-1] if known else "root").encode())
        digest.update(",".join(map(str, seq.token_ids[begin:end])).encode())
        for start, length, content in visuals:
            if start < end and start + length > begin:  # a medium's tokens lie in this block: which of them
                digest.update(f"|{content}@{start - begin}".encode())
        known.append(digest.hexdigest())
    return known[:count]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 cache_decoded_blocks: bool = True):
        """cache_decoded_blocks: whether blocks whose K/V decode steps wrote join the cache too. A decode step
        stores K/V rounded from float32 sums where a prefill of the same tokens rounds them its own way in a
        16-bit cache, and a prompt that read them would be answered unlike with caching off: the engine caches
        them for a float32 cache only (a prompt's blocks, prefill-written, are cached either way)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.cache_decoded_blocks = cache_decoded_blocks
        self.reset()

    def reset(self) -> None:
        """Every block free again and nothing cached, whoever held what: for an engine whose sequences were all
        dropped (a step cut short may have left blocks half written)."""
        self.free_blocks = deque(range(self.num_blocks))  # never hashed, or hash dropped: no one holds them
        self.ref_counts = [0] * self.num_blocks
        self.block_hash: dict[int, str] = {}               # hashed block -> its hash
        self.cached: dict[str, int] = {}                   # hash -> block holding it
        self.evictable: OrderedDict[int, None] = OrderedDict()  # hashed blocks no one holds, least recently used first
        # Blocks promised to running beam searches (engine.beam_search), which their beams may still take: not free
        # to the scheduler's sequences.
        self.promised = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can be given: free ones and cached ones no one holds, less those promised."""
        return len(self.free_blocks) + len(self.evictable) - self.promised

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence holds (a shared block counted once)."""
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self.block_size)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks the sequence's leading full blocks are, as many as match; the last token is always
        left to compute (its logits pick the next token). None for a sequence owing prompt logprobs: each of its
        prompt's rows must be computed for its logits."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        hits = []
        for digest in block_hashes(seq, self.block_size, (seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(digest)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self.cached_prefix(seq)
        taken_from_pool = self.blocks_for(seq.num_tokens) - len(hits) + sum(1 for b in hits if b in self.evictable)
        return taken_from_pool <= self.num_free_blocks

    def allocate(self, seq: Sequence, use_cache: bool = True, max_compute: int | None = None) -> None:
        """Blocks for every token the sequence holds now: its cached prefix shared (unless not `use_cache`), new
        blocks for the rest (which its prefill writes). Sets seq.num_cached_tokens and the tokens its first
        prefill step computes: all the rest, or at most `max_compute` of them (chunked prefill)."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self.cached_prefix(seq) if use_cache else []
        for block in hits:
            self._hold(block)
        seq.block_table = hits + [self._take() for _ in range(self.blocks_for(seq.num_tokens) - len(hits))]
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        seq.cached_visual_items, seq.visuals_counted = 0, set()
        seq.prefill_start = seq.num_cached_tokens
        seq.prefill_end = seq.num_tokens if max_compute is None else min(seq.num_tokens,
                                                                            seq.prefill_start + max_compute)
        if use_cache:
            self.register_prefill(seq)

    def register_prefill(self, seq: Sequence) -> None:
        """Before a prefill step: the blocks it fills join the cache. A layer stores all of a step's K/V before any
        sequence attends, so a sequence admitted into the same step reads them as a cached prefix already."""
        self._register(seq, seq.prefill_end // self.block_size)

    def can_append(self, seq: Sequence) -> bool:
        """A decode step writes the last token's K/V: is there room, or a free block to make room?"""
        return len(seq.block_table) >= self.blocks_for(seq.num_tokens) or self.num_free_blocks > 0

    def append(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.append(self._take())

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for the sequence's first `num_tokens` tokens (a decode step's guessed tokens past its own), taken
        from free ones only: False, and nothing taken, where there are too few."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > self.num_free_blocks:
            return False
        for _ in range(missing):
            seq.block_table.append(self._take())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child (a beam search's continuation of `parent`) holds the parent's blocks too: the K/V of the tokens
        they share are in memory once. Before a step writes into a block both hold, own_block_for_newest gives the
        writer a copy."""
        for block in parent.block_table:
            self._hold(block)
        child.block_table = list(parent.block_table)
        child.block_hash_cache = list(parent.block_hash_cache)
        child.num_hashed_blocks = parent.num_hashed_blocks

    def own_block_for_newest(self, seq: Sequence) -> tuple | None:
        """Before a decode step writes the sequence's newest token's K/V: a block for it, a new one where its slot
        opens a block, and where the block holding the slot is shared (forks), a copy of its own. Returns (the
        shared block, the copy) for the caller to copy the K/V over, else None."""
        index = (seq.num_tokens - 1) // self.block_size
        if index == len(seq.block_table):
            self.append(seq)
            return None
        block = seq.block_table[index]
        if self.ref_counts[block] == 1:
            return None
        copy = self._take()
        self.ref_counts[block] -= 1
        seq.block_table[index] = copy
        return block, copy

    def release_unused(self, seq: Sequence) -> None:
        """The blocks past the sequence's tokens go back to the free ones: those a decode step reserved for guesses
        the model did not keep (never hashed: no token of theirs is the sequence's). Held on, they would make the
        next steps preempt other sequences for want of blocks that hold nothing."""
        while len(seq.block_table) > self.blocks_for(seq.num_tokens):
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)

    def register_written(self, seq: Sequence) -> None:
        """After a decode step: the sequence's blocks whose K/V are now all written (every token but its newest,
        which no step has computed yet) join the cache (those a prefill wrote only, without cache_decoded_blocks)."""
        full = (seq.num_tokens - 1) // self.block_size
        if not self.cache_decoded_blocks:
            full = min(full, seq.decode_from // self.block_size)
        self._register(seq, full)

    def _register(self, seq: Sequence, full: int) -> None:
        """The sequence's first `full` blocks join the cache, those not in it yet. A block whose hash is already
        cached (another sequence computed the same tokens) stays the sequence's own."""
        if not self.enable_prefix_caching:
            return
        for index, digest in enumerate(block_hashes(seq, self.block_size, full)[seq.num_hashed_blocks:],
                                       start=seq.num_hashed_blocks):
            block = seq.block_table[index]
            if digest not in self.cached and block not in self.block_hash:
                self.cached[digest] = block
                self.block_hash[block] = digest
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def forget_uncomputed(self, seq: Sequence) -> None:
        """The blocks past what earlier steps computed (its cached prefix, its earlier chunks) leave the cache: they
        were registered before the step that writes them ran (a same-step sequence may share them; it is undone
        alike)."""
        for block in seq.block_table[seq.prefill_start // self.block_size:]:
            digest = self.block_hash.pop(block, None)
            if digest is not None:
                del self.cached[digest]

    def free(self, seq: Sequence) -> None:
        """The sequence lets its blocks go: hashed ones stay cached (most recently used last), the others are free."""
        for block in reversed(seq.block_table):  # the tail last: a prefix outlives its continuations
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.block_hash:
                    self.evictable[block] = None  # most recently used: evicted after everything cached before
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def _hold(self, block: int) -> None:
        self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    def _take(self) -> int:
        """A block for new K/V: a free one, else the least recently used cached one, its hash forgotten."""
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash.pop(block)]
        self.ref_counts[block] = 1
        return block
