"""Attention over a paged KV cache.

The cache of one layer is a pair of tensors [num_blocks, kv_heads, block_size, head_dim]; token j of a sequence
lives in block block_table[j // block_size] at offset j % block_size. With the heads outside the tokens in a
block, a decode step's gather of a one-block context is already in the [batch, kv_heads, tokens, head_dim] layout
attention multiplies by, with no further copy. Per-step metadata travels in one `StepContext`, made by the model
runner for each step and passed down through the model's forward.

Prefill is written here; a decode step is the model's Kernels.decode_attention (atb_models/kernels/attention.py).
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from atb_models.kernels.attention import SegmentAttention, store_kv
from atb_models.layers.rotary import apply_rotary


@dataclass
class StepContext:
    is_prefill: bool
    slot_mapping: torch.Tensor                    # [2, tokens] (block, offset) each new token's K/V goes to
    seq_starts: Optional[list] = None             # prefill: offsets of each sequence in the flat token stream
    block_tables: Optional[torch.Tensor] = None   # decode: [batch, max_blocks] each sequence's blocks, padded
    context_mask: Optional[torch.Tensor] = None   # decode: [batch, 1, 1, max_blocks * block_size] True where real
                                                  # (made by decode_mask where a kernel asks for it)
    context_lens: Optional[torch.Tensor] = None   # decode: [batch] int64, each sequence's length with its new token
    prefix_lens: Optional[list] = None            # prefill: tokens of each sequence already in the cache (prefix
    prefix_tables: Optional[list] = None          # caching), and each one's block table; None when none has any
    kernel_state: dict = field(default_factory=dict)  # what a kernel keeps for the rest of this step

    def decode_mask(self, slots: int) -> torch.Tensor:
        """context_mask for a decode step whose gathered context is `slots` rows a sequence, made from context_lens
        on the first call of the step (PyTorch's attention reads it; the native decode step never does, and a few
        tensor operators a step cost it time after the weights have streamed through the caches)."""
        if self.context_mask is None:
            rows = torch.arange(slots, device=self.context_lens.device)
            self.context_mask = (rows[None, :] < self.context_lens[:, None])[:, None, None, :]
        return self.context_mask


def prefill_attention(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: StepContext, scale: float,
                      upcast: bool, attention: SegmentAttention = SegmentAttention()) -> torch.Tensor:
    """qkv: [tokens, heads + 2 * kv_heads, dim], one layer's projection of the prompt tokens the step computes.
    Rotates q and k by (cos, sin) [tokens, dim], stores K and V, and attends causally within each sequence: over its
    own new tokens (by `attention`, the model's Kernels.attention), and where its prefix came from the cache
    (ctx.prefix_lens), over that prefix's K/V read back from the cache too. Returns [tokens, heads, dim]; softmax in
    float32 when `upcast`."""
    # q and k heads sit side by side: one rotation for both.
    qk = apply_rotary(qkv[:, :num_heads + num_kv_heads], cos, sin)
    q, k, v = qk[:, :num_heads], qk[:, num_heads:], qkv[:, num_heads + num_kv_heads:]
    store_kv(k_cache, v_cache, k, v, ctx.slot_mapping)
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    starts = ctx.seq_starts
    for i, (begin, end) in enumerate(zip(starts[:-1], starts[1:])):
        prefix = ctx.prefix_lens[i] if ctx.prefix_lens is not None else 0
        if prefix:
            # K/V of the prefix and the new tokens alike read back from the cache, through the same kernel as a
            # prompt computed whole: a row's result does not depend on how much of its prompt was cached.
            keys, values = (_cached_rows(cache, ctx.prefix_tables[i], prefix + end - begin).to(q.dtype)
                            for cache in (k_cache, v_cache))
            attention(q[begin:end], keys, values, scale, True, out[begin:end])
        else:
            attention(q[begin:end], k[begin:end], v[begin:end], scale, True, out[begin:end])
    return out.to(qkv.dtype)


def _cached_rows(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens' rows [length, kv_heads, dim] of a sequence's blocks in a cache."""
    kv_heads, _, dim = cache.shape[1:]
    return cache[block_table].transpose(1, 2).reshape(-1, kv_heads, dim)[:length]
