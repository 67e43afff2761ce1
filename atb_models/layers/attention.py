"""Attention over a paged KV cache.

The cache of one layer is a pair of tensors [num_blocks, kv_heads, block_size, head_dim]; token j of a sequence
lives in block block_table[j // block_size] at offset j % block_size. With the heads outside the tokens in a
block, a decode step's gather of a one-block context is already in the [batch, kv_heads, tokens, head_dim] layout
attention multiplies by, with no further copy. Per-step metadata travels in one `StepContext`, set by the model
runner before the forward pass, instead of through every signature.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from atb_models.layers.rotary import apply_rotary


@dataclass
class StepContext:
    is_prefill: bool
    slot_mapping: torch.Tensor                    # [2, tokens] (block, offset) each new token's K/V goes to
    seq_starts: Optional[list] = None             # prefill: offsets of each sequence in the flat token stream
    block_tables: Optional[torch.Tensor] = None   # decode: [batch, max_blocks] each sequence's blocks, padded
    context_mask: Optional[torch.Tensor] = None   # decode: [batch, 1, 1, max_blocks * block_size] True where real
    context_lens: Optional[torch.Tensor] = None   # decode: [batch] int64, each sequence's length with its new token
    native_step: Optional[object] = None          # decode: platform.DecodeStep, made by the step's first layer


_context: Optional[StepContext] = None


def set_context(ctx: Optional[StepContext]) -> None:
    global _context
    _context = ctx


def get_context() -> StepContext:
    return _context


# The CPU's native decode attention (platform.decode_attention_kernel), set once by the model runner; None: PyTorch.
_native_decode = None


def set_decode_attention_kernel(kernel) -> None:
    global _native_decode
    _native_decode = kernel


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
    """slots: [2, tokens] (block, offset) of each token, from the model runner once per step."""
    where = (slots[0], slots[1])
    # [num_blocks, block_size, kv_heads, dim] views: (block, offset) picks one token's [kv_heads, dim].
    k_cache.transpose(1, 2).index_put_(where, k)
    v_cache.transpose(1, 2).index_put_(where, v)


# Gathered blocks go into buffers kept between steps (grown when a step needs more), not fresh tensors: a fresh
# multi-megabyte tensor costs page faults on every layer of every step on the CPU.
_buffers: dict = {}


def _buffer(name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    numel = math.prod(shape)
    buffer = _buffers.get(name)
    if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
        buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        _buffers[name] = buffer
    return buffer[:numel].view(shape)


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, name: str) -> torch.Tensor:
    """[batch, kv_heads, blocks * block_size, dim]: each sequence's blocks in order (whole blocks; the mask hides
    the unused tail)."""
    batch, num_blocks = block_tables.shape
    _, heads, block_size, dim = cache.shape
    gathered = torch.index_select(cache, 0, block_tables.flatten(),
                                  out=_buffer(name, (batch * num_blocks, heads, block_size, dim), cache))
    if num_blocks == 1:
        return gathered.view(batch, heads, block_size, dim)
    context = _buffer(name + "_ordered", (batch, heads, num_blocks, block_size, dim), cache)
    context.copy_(gathered.view(batch, num_blocks, heads, block_size, dim).transpose(1, 2))
    return context.view(batch, heads, num_blocks * block_size, dim)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, scale: float, upcast: bool) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim] for the new tokens. Returns [tokens, heads, dim].

    Prefill attends causally within each sequence's own new tokens (the whole prompt is computed in this step);
    decode attends from each sequence's one new token to its context read through the block table.
    """
    ctx = get_context()
    store_kv(k_cache, v_cache, k, v, ctx.slot_mapping)
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if ctx.is_prefill:
        outs = []
        starts = ctx.seq_starts
        for begin, end in zip(starts[:-1], starts[1:]):
            qi = q[begin:end].transpose(0, 1).unsqueeze(0)
            ki = k[begin:end].transpose(0, 1).unsqueeze(0)
            vi = v[begin:end].transpose(0, 1).unsqueeze(0)
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
            outs.append(oi[0].transpose(0, 1))
        out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
    else:
        kc = gather_context(k_cache, ctx.block_tables, "k")  # [batch, kv_heads, L, dim]
        vc = gather_context(v_cache, ctx.block_tables, "v")
        if upcast:
            kc, vc = kc.float(), vc.float()
        if q.device.type == "cpu" and q.shape[0] > 1:
            out = _grouped_decode_attention(q, kc, vc, ctx.context_mask, scale)
        else:
            qb = q.unsqueeze(2)  # [batch, heads, 1, dim]
            out = F.scaled_dot_product_attention(qb, kc, vc, attn_mask=ctx.context_mask, scale=scale,
                                                 enable_gqa=True).squeeze(2)
    return out.to(out_dtype)


def rotary_paged_attention(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
                           sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                           upcast: bool) -> torch.Tensor:
    """qkv: [tokens, heads + 2 * kv_heads, dim], one layer's projection. Rotates q and k by (cos, sin) [tokens, dim]
    and attends (paged_attention). A CPU decode step with the native kernel does both in one call."""
    q, k, v = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads:]
    ctx = get_context()
    if not ctx.is_prefill and not upcast and _native_decode is not None and _native_decode.suits(q, k_cache):
        return _native_decode(q, k, v, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, cos, sin)
    # q and k heads sit side by side: one rotation for both.
    qk = apply_rotary(qkv[:, :num_heads + num_kv_heads], cos, sin)
    return paged_attention(qk[:, :num_heads], qk[:, num_heads:], v, k_cache, v_cache, scale, upcast)


def _grouped_decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """Decode attention as two batched matmuls over (sequence, KV head) pairs, the query heads sharing a KV head
    stacked as rows: q [batch, heads, dim], kc and vc [batch, kv_heads, L, dim], mask [batch, 1, 1, L]. Scores
    and softmax in float32. On the CPU it beats SDPA's kernel from batch 2 up, by 1.3-2.3x at batch 16, and loses
    at batch 1 (`python tools/microbench_cpu.py attention`, docs/PERFORMANCE.md)."""
    batch, heads, dim = q.shape
    kv_heads, length = kc.shape[1], kc.shape[2]
    group = heads // kv_heads
    grouped = q.reshape(batch * kv_heads, group, dim)
    scores = torch.bmm(grouped, kc.reshape(batch * kv_heads, length, dim).transpose(1, 2)).float().mul_(scale)
    scores = scores.view(batch, kv_heads, group, length).masked_fill_(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(vc.dtype).view(batch * kv_heads, group, length)
    return torch.bmm(weights, vc.reshape(batch * kv_heads, length, dim)).view(batch, heads, dim)
