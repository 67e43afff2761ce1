"""A decode step's attention over the paged KV cache (layout in atb_models/layers/attention.py): rotate the new
token's q and k, store its K and V, attend from q to each sequence's context read through its block table.

Three implementations, one chosen per model by `Kernels.for_plan`: SDPA over the gathered context
(accelerators), the CPU's grouped matmuls, and the kit's native kernel on a CPU with AVX-512 or AVX2 in float32,
which does the whole step in one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from atb_models.kernels.native import kernel_name
from atb_models.layers.rotary import apply_rotary


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
    """slots: [2, tokens] (block, offset) of each token, from the model runner once per step."""
    where = (slots[0], slots[1])
    # [num_blocks, block_size, kv_heads, dim] views: (block, offset) picks one token's [kv_heads, dim].
    k_cache.transpose(1, 2).index_put_(where, k)
    v_cache.transpose(1, 2).index_put_(where, v)


class SdpaDecodeAttention:
    """Gathers each sequence's blocks and attends with PyTorch's SDPA under the step's context mask."""

    name = "sdpa"

    def __init__(self):
        # Gathered blocks go into buffers kept between steps (grown when a step needs more), not fresh tensors: a
        # fresh multi-megabyte tensor costs page faults on every layer of every step on the CPU.
        self._buffers = {}

    def __call__(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx, scale: float,
                 upcast: bool) -> torch.Tensor:
        """qkv [batch, heads + 2 * kv_heads, dim], the projection of each sequence's new token, not yet rotated;
        cos, sin [batch, dim]; ctx: the step's layers.attention.StepContext. Returns [batch, heads, dim] in qkv's
        dtype; scores and softmax run in float32 when `upcast`."""
        # q and k heads sit side by side: one rotation for both.
        qk = apply_rotary(qkv[:, :num_heads + num_kv_heads], cos, sin)
        q, k, v = qk[:, :num_heads], qk[:, num_heads:], qkv[:, num_heads + num_kv_heads:]
        store_kv(k_cache, v_cache, k, v, ctx.slot_mapping)
        kc = self.gather(k_cache, ctx.block_tables, "k")  # [batch, kv_heads, L, dim]
        vc = self.gather(v_cache, ctx.block_tables, "v")
        if upcast:
            q, kc, vc = q.float(), kc.float(), vc.float()
        return self.attend(q, kc, vc, ctx.decode_mask(kc.shape[2]), scale).to(qkv.dtype)

    def attend(self, q, kc, vc, mask, scale: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, attn_mask=mask, scale=scale,
                                              enable_gqa=True).squeeze(2)

    def gather(self, cache: torch.Tensor, block_tables: torch.Tensor, name: str) -> torch.Tensor:
        """[batch, kv_heads, blocks * block_size, dim]: each sequence's blocks in order (whole blocks; the mask
        hides the unused tail), in this object's buffer `name` (valid until its next gather of that name)."""
        batch, num_blocks = block_tables.shape
        _, heads, block_size, dim = cache.shape
        gathered = torch.index_select(cache, 0, block_tables.flatten(),
                                      out=self._buffer(name, (batch * num_blocks, heads, block_size, dim), cache))
        if num_blocks == 1:
            return gathered.view(batch, heads, block_size, dim)
        context = self._buffer(name + "_ordered", (batch, heads, num_blocks, block_size, dim), cache)
        context.copy_(gathered.view(batch, num_blocks, heads, block_size, dim).transpose(1, 2))
        return context.view(batch, heads, num_blocks * block_size, dim)

    def _buffer(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)


class CpuDecodeAttention(SdpaDecodeAttention):
    """On the CPU, two batched matmuls over (sequence, KV head) pairs, which beat SDPA's kernel from batch 2 up
    (`python tools/microbench_cpu.py attention`, docs/PERFORMANCE.md). Batch 1 too, though SDPA is faster there:
    a sequence's sums must not depend on what it is decoded with, and SDPA's differ from the matmuls' (in
    bfloat16 by a unit of its last place, enough to change a greedy token: a bfloat16 model at two ranks or more,
    whose layers the native decoder layer does not take, decodes through here)."""

    name = "grouped matmuls"

    def attend(self, q, kc, vc, mask, scale):
        return grouped_decode_attention(q, kc, vc, mask, scale)


def grouped_decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Decode attention as two batched matmuls over (sequence, KV head) pairs, the query heads sharing a KV head
    stacked as rows: q [batch, heads, dim], kc and vc [batch, kv_heads, L, dim], mask [batch, 1, 1, L]. Scores
    and softmax in float32."""
    batch, heads, dim = q.shape
    kv_heads, length = kc.shape[1], kc.shape[2]
    group = heads // kv_heads
    grouped = q.reshape(batch * kv_heads, group, dim)
    scores = torch.bmm(grouped, kc.reshape(batch * kv_heads, length, dim).transpose(1, 2)).float().mul_(scale)
    scores = scores.view(batch, kv_heads, group, length).masked_fill_(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(vc.dtype).view(batch * kv_heads, group, length)
    return torch.bmm(weights, vc.reshape(batch * kv_heads, length, dim)).view(batch, heads, dim)


class NativeDecodeAttention(CpuDecodeAttention):
    """The kit's own decode attention for the CPU in float32 (atb_models/csrc/paged_decode_attention.h): rotates
    q and k, stores the step's K and V and attends over each sequence's context read in place through its block
    table, one call per layer instead of about fifteen operator calls (the rotation's five, two index_puts, two
    block gathers, mask, softmax, two matmuls). Steps it does not suit run the grouped matmuls."""

    name = "native"

    def __init__(self, library):
        super().__init__()
        self._op = library.atb_paged_decode_attention_f32
        self.name = kernel_name(self.name, library)

    @staticmethod
    def suits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
                and q.shape[-1] % 16 == 0)

    def __call__(self, qkv, num_heads, num_kv_heads, cos, sin, k_cache, v_cache, ctx, scale, upcast):
        q, k, v = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads:]
        if upcast or not self.suits(q, k_cache):
            return super().__call__(qkv, num_heads, num_kv_heads, cos, sin, k_cache, v_cache, ctx, scale, upcast)
        return self.attend_paged(q, k, v, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, cos, sin)

    def attend_paged(self, q, k, v, k_cache, v_cache, block_tables, context_lens, scale: float, cos=None,
                     sin=None) -> torch.Tensor:
        """q [batch, heads, dim], k and v [batch, kv_heads, dim] (rows may be strided, each row contiguous),
        caches [blocks, kv_heads, block_size, dim], block_tables [batch, max_blocks] and context_lens [batch]
        int64 (each length counts the new token); cos and sin [batch, dim] float32: q and k are rotated here
        (None: they come rotated). Returns [batch, heads, dim]."""
        batch, heads, dim = q.shape
        for t in (q, k, v):
            if t.stride(2) != 1 or t.stride(1) != dim:
                raise ValueError("decode attention needs each row's heads contiguous")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("decode attention needs contiguous KV caches")
        tables = block_tables.contiguous()
        lengths = context_lens.contiguous()
        out = torch.empty(batch, heads, dim, dtype=torch.float32)
        if cos is not None:
            cos, sin = cos.float().contiguous(), sin.float().contiguous()
        self._op(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                 None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
                 k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1], lengths.data_ptr(),
                 batch, heads, k_cache.shape[1], dim, k_cache.shape[2], scale, out.data_ptr())
        return out


# ------------------------------------------------------------------------------------ attention within segments

class SegmentAttention:
    """Attention within segments: each of a prefill's sequences (causal), each image or video frame of a vision
    block (not), by PyTorch's SDPA. The kit's bfloat16 kernel (NativeBf16Attention) takes its place where it
    runs."""

    name = "sdpa"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
                 out: torch.Tensor, count: int = 1) -> torch.Tensor:
        """q [count * n_q, heads, dim], k and v [count * n_k, kv_heads, dim]: `count` segments of n_q queries and
        n_k keys, one after another; segment s's queries attend to its own keys only, with `causal` query i to its
        keys 0..n_k - n_q + i. Writes out [count * n_q, heads, dim] (q's dtype) and returns it. scale None: 1 /
        sqrt(dim)."""
        n_q, n_k = q.shape[0] // count, k.shape[0] // count
        qs, ks, vs = (t.view(count, n, *t.shape[1:]).transpose(1, 2) for t, n in ((q, n_q), (k, n_k), (v, n_k)))
        if causal and n_q != n_k:  # the last n_q of n_k positions (a prefix in the cache before them)
            visible = torch.arange(n_k, device=q.device)[None, :] <= torch.arange(n_k - n_q, n_k,
                                                                                  device=q.device)[:, None]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=visible, scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=True)
        out.view(count, n_q, *out.shape[1:]).copy_(o.transpose(1, 2))
        return out


class NativeBf16Attention(SegmentAttention):
    """The kit's attention within segments for bfloat16 rows, by AVX512-BF16's dot product
    (atb_models/csrc/bf16_attention.h): PyTorch's arithmetic (float32 scores and softmax, bfloat16 weights times
    the values summed in float32), its sums in another order. Heads of 64, 80 or 128 values; anything else runs
    PyTorch's SDPA."""

    name = "native bf16 (AVX512-BF16)"
    HEAD_DIMS = (64, 80, 128)

    def __init__(self, library):
        self._op = library.atb_bf16_attention

    def suits(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> bool:
        dim = q.shape[-1]
        return (dim in self.HEAD_DIMS and q.shape[0] > 0 and k.shape[0] > 0
                and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.stride(2) == 1 and t.stride(1) == dim
                        for t in (q, k, v, out)))

    def __call__(self, q, k, v, scale, causal, out, count=1):
        n_q, n_k = q.shape[0] // count, k.shape[0] // count
        if not self.suits(q, k, v, out) or (causal and n_q > n_k):
            return super().__call__(q, k, v, scale, causal, out, count)
        heads, dim = q.shape[1], q.shape[2]
        done = self._op(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), count, n_q,
                        n_k, heads, k.shape[1], dim, int(causal), dim ** -0.5 if scale is None else scale,
                        out.data_ptr(), out.stride(0))
        if done != 0:
            raise RuntimeError(f"the kit's bfloat16 attention refused q {tuple(q.shape)}, k {tuple(k.shape)}")
        return out


def segment_attention(plan, library, cpu_flags: set, vision: bool = False) -> SegmentAttention:
    """The attention within segments for a plan: the kit's bfloat16 kernel where the tower (the language model's prompt,
    or with `vision` the vision tower) computes in bfloat16 on a CPU whose library has AVX512-BF16's dot product,
    PyTorch's SDPA elsewhere. `vision`: the vision tower's (within images and frames), which on a CPU with AMX is
    PyTorch's: its flash attention multiplies in AMX tiles, 2-4 times as fast as the kit's kernel there
    (docs/PERFORMANCE.md). Not the language model's: PyTorch's sums there differ with how many of a prompt's rows are
    computed (measured on an AMX CPU), so a prompt whose prefix came from the cache would get other tokens than the same
    prompt computed whole; the kit's kernel gives a row the same sums either way (for the head sizes and shapes it
    takes: NativeBf16Attention). cpu_flags: /proc/cpuinfo's flags."""
    if (plan.kind == "cpu" and library is not None and library.isa == "avx512" and library.atb_bf16_dot_available()
            and (plan.vision_dtype if vision else plan.llm_dtype) == torch.bfloat16
            and not (vision and "amx_bf16" in cpu_flags)):
        return NativeBf16Attention(library)
    return SegmentAttention()
