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
import torch.nn.functional as F

from atb_models.kernels.attention import SegmentAttention, store_kv
from atb_models.layers.rotary import apply_rotary


@dataclass
class StepContext:
    is_prefill: bool
    slot_mapping: torch.Tensor                    # [2, tokens] (block, offset) each new token's K/V goes to
    seq_starts: Optional[list] = None             # prefill: offsets of each sequence in the flat token stream
    block_tables: Optional[torch.Tensor] = None   # decode: [batch, max_blocks] each sequence's blocks, padded
    context_mask: Optional[torch.Tensor] = None   # decode: [batch, 1, 1, max_blocks * block_size] True where real
    context_lens: Optional[torch.Tensor] = None   # decode: [batch] int64, each sequence's length with its new token
    prefix_lens: Optional[list] = None            # prefill: tokens of each sequence already in the cache (prefix
    prefix_tables: Optional[list] = None          # caching), and each one's block table; None when none has any
    kernel_state: dict = field(default_factory=dict)  # what a kernel keeps for the rest of this step


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
            out[begin:end] = _attend_after_prefix(q[begin:end], k_cache, v_cache, ctx.prefix_tables[i],
                                                  prefix + end - begin, scale)
        else:
            attention(q[begin:end], k[begin:end], v[begin:end], scale, True, out[begin:end])
    return out.to(qkv.dtype)


def _attend_after_prefix(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                         length: int, scale: float) -> torch.Tensor:
    """q [new, heads, dim] of a sequence's last `new` tokens, whose K/V (prefix and new alike) are in the cache:
    token i attends to the first length - new + i + 1 of them. Returns [new, heads, dim] in q's dtype."""
    new = q.shape[0]
    kv_heads, block_size, dim = k_cache.shape[1:]
    keys, values = (cache[block_table].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :length].to(q.dtype)
                    for cache in (k_cache, v_cache))
    visible = torch.arange(length, device=q.device)[None, :] <= torch.arange(length - new, length,
                                                                              device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                         attn_mask=visible, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
