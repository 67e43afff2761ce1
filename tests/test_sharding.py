"""The head-sharding rule: every real query head lands on exactly one rank, beside its KV head."""
import pytest

from atb_models.errors import UserError
from atb_models.layers.sharding import HeadLayout, even_split


@pytest.mark.parametrize("heads,kv,world,q_per_rank,kv_per_rank", [
    (12, 2, 1, 12, 2), (12, 2, 2, 6, 1), (12, 2, 4, 3, 1), (12, 2, 8, 2, 1),   # Qwen2-VL-2B
    (28, 4, 2, 14, 2), (28, 4, 4, 7, 1), (28, 4, 8, 4, 1),                     # 7B
    (64, 8, 4, 16, 2), (64, 8, 8, 8, 1),                                       # 72B
])
def test_real_query_heads_are_dealt_out_once_with_their_kv_head(heads, kv, world, q_per_rank, kv_per_rank):
    seen = []
    for rank in range(world):
        layout = HeadLayout(heads, kv, world, rank)
        assert (layout.q_per_rank, layout.kv_per_rank) == (q_per_rank, kv_per_rank)
        first, count = layout.real_q_heads()
        assert 0 <= count <= layout.q_per_rank
        for head in range(first, first + count):
            kv_head = head // (heads // kv)
            # The head's KV head is held by this rank, at the slot grouped-query attention pairs it with.
            local_kv = kv_head - layout.first_kv
            assert 0 <= local_kv < layout.kv_per_rank
            assert (head - first) // layout.q_per_group == local_kv
        seen.extend(range(first, first + count))
    assert sorted(seen) == list(range(heads))


def test_padding_matches_the_reference_kit_counts():
    assert HeadLayout(12, 2, 8, 0).q_per_rank * 8 == 16
    assert HeadLayout(28, 4, 8, 0).q_per_rank * 8 == 32


@pytest.mark.parametrize("heads,kv,world", [(12, 3, 2), (12, 2, 3), (10, 4, 2)])
def test_impossible_head_counts_are_a_clear_error(heads, kv, world):
    with pytest.raises(UserError):
        HeadLayout(heads, kv, world, 0)


def test_even_split_refuses_a_remainder():
    assert even_split(8960, 8, 3, "intermediate_size") == (3360, 1120)
    with pytest.raises(UserError, match="intermediate_size 10 does not divide among 4 ranks"):
        even_split(10, 4, 0, "intermediate_size")
