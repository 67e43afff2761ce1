"""KV-cache blocks: which are free, which belong to whom."""
from collections import deque

from atb_models.engine.sequence import Sequence
from atb_models.layers.sharding import ceil_div


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(seq.num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token the sequence holds now (its prefill writes them all)."""
        assert not seq.block_table, "sequence already holds blocks"
        seq.block_table = [self.free_blocks.popleft() for _ in range(self.blocks_for(seq.num_tokens))]

    def can_append(self, seq: Sequence) -> bool:
        """A decode step writes the last token's K/V: is there room, or a free block to make room?"""
        return len(seq.block_table) >= self.blocks_for(seq.num_tokens) or self.num_free_blocks > 0

    def append(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []

    def reset(self) -> None:
        """Every block free again, whoever held it: for an engine whose sequences were all dropped."""
        self.free_blocks = deque(range(self.num_blocks))
