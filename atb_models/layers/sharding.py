"""How tensor parallelism divides attention heads, MLP columns and the vocabulary among ranks.

Attention heads: each rank holds whole KV heads and the query heads that use them. When there are fewer KV heads
than ranks, a KV head is replicated on `ranks_per_kv` ranks that split its query heads between them; when the
query heads of a group do not divide evenly, every rank is given the same count and the missing ones are zero
heads (zero rows in q, zero columns in o_proj, so they add nothing). So Qwen2-VL-2B (12 heads / 2 KV) runs at 8
ranks as 16 query heads, 2 per rank, and 7B (28 / 4) as 32.
"""
from dataclasses import dataclass

from atb_models.errors import UserError


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    world_size: int
    rank: int

    def __post_init__(self):
        heads, kv, world = self.num_heads, self.num_kv_heads, self.world_size
        if heads % kv:
            raise UserError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        if (kv >= world and kv % world) or (kv < world and world % kv):
            raise UserError(f"{kv} key/value heads cannot be shared among {world} ranks: one count must divide "
                            "the other")

    @property
    def group_size(self) -> int:
        """Query heads per KV head in the checkpoint."""
        return self.num_heads // self.num_kv_heads

    @property
    def ranks_per_kv(self) -> int:
        return max(1, self.world_size // self.num_kv_heads)

    @property
    def kv_per_rank(self) -> int:
        return max(1, self.num_kv_heads // self.world_size)

    @property
    def q_per_group(self) -> int:
        """Query heads of one KV group held by one rank, zero heads included."""
        return ceil_div(self.group_size, self.ranks_per_kv)

    @property
    def q_per_rank(self) -> int:
        return self.kv_per_rank * self.q_per_group

    @property
    def first_kv(self) -> int:
        return self.rank * self.kv_per_rank // self.ranks_per_kv

    def real_q_heads(self) -> tuple:
        """(first, count) of the checkpoint's query heads this rank holds; they are contiguous. The rank pads
        them with q_per_rank - count zero heads."""
        part = self.rank % self.ranks_per_kv
        within = min(self.q_per_group, max(0, self.group_size - part * self.q_per_group))
        if self.ranks_per_kv == 1:
            return self.first_kv * self.group_size, self.kv_per_rank * self.group_size
        return self.first_kv * self.group_size + part * self.q_per_group, within


def even_split(total: int, world_size: int, rank: int, what: str) -> tuple:
    """(start, size) of rank's equal share of `total` rows."""
    if total % world_size:
        raise UserError(f"{what} {total} does not divide among {world_size} ranks")
    size = total // world_size
    return rank * size, size
