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

from atb_models.kernels.attention import store_kv
from atb_models.layers.rotary import apply_rotary


@dataclass
class StepContext:
    is_prefill: bool
    slot_mapping: torch.Tensor                    # [2, tokens] (block, offset) each new token's K/V goes to
    seq_starts: Optional[list] = None             # prefill: offsets of each sequence in the flat token stream
    block_tables: Optional[torch.Tensor] = None   # decode: [batch, max_blocks] each sequence's blocks, padded
    context_mask: Optional[torch.Tensor] = None   # decode: [batch, 1, 1, max_blocks * block_size] True where real
    context_lens: Optional[torch.Tensor] = None   # decode: [batch] int64, each sequence's length with its new token
    kernel_state: dict = field(default_factory=dict)  # what a kernel keeps for the rest of this step


def prefill_attention(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: StepContext, scale: float,
                      upcast: bool) -> torch.Tensor:
    """qkv: [tokens, heads + 2 * kv_heads, dim], one layer's projection of every prompt token of the step. Rotates
    q and k by (cos, sin) [tokens, dim], stores K and V, and attends causally within each sequence's own tokens
    (the whole prompt is computed in this step). Returns [tokens, heads, dim]; softmax in float32 when `upcast`."""
    # q and k heads sit side by side: one rotation for both.
    qk = apply_rotary(qkv[:, :num_heads + num_kv_heads], cos, sin)
    q, k, v = qk[:, :num_heads], qk[:, num_heads:], qkv[:, num_heads + num_kv_heads:]
    store_kv(k_cache, v_cache, k, v, ctx.slot_mapping)
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    outs = []
    starts = ctx.seq_starts
    for begin, end in zip(starts[:-1], starts[1:]):
        qi, ki, vi = (t[begin:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        outs.append(oi[0].transpose(0, 1))
    out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
    return out.to(qkv.dtype)
