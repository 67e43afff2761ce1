"""Qwen2-VL: the vision tower, the patch merger and the Qwen2 language model with M-RoPE.

Written for serving: the vision tower attends within each image / each temporal slice of a video (no dense mask
over all patches), the language model reads and writes a paged KV cache, and logits are computed only for the
rows that are sampled. transformers' `modeling_qwen2_vl.py` is the reference the tests compare against.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from atb_models import distributed
from atb_models.config import mrope_section
from atb_models.errors import UserError
from atb_models.kernels import Kernels
from atb_models.kernels.vision import QuickGelu
from atb_models.layers.attention import StepContext, prefill_attention
from atb_models.layers.linear import (Embedding, Linear, MergedColumnParallelLinear, QKVParallelLinear,
                                      RowParallelLinear, VocabParallelLMHead)
from atb_models.layers.norm import RMSNorm
from atb_models.layers.sharding import HeadLayout
from atb_models.layers.rotary import MRotaryEmbedding, VisionRotaryEmbedding

_ACTIVATIONS = {
    "quick_gelu": QuickGelu(),
    "gelu": F.gelu,
    "silu": F.silu,
}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}")
    return _ACTIVATIONS[name]


class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__(dim, eps=eps, dtype=dtype)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)


# ----------------------------------------------------------------------------------------------- vision tower


class VisionAttention(nn.Module):
    """The vision tower's attention over one step's patches, split into segments that each attend only to
    themselves (no dense mask over all patches)."""

    def __init__(self, dim: int, num_heads: int, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, 3 * dim, True, dtype, kernels.linear)
        self.proj = Linear(dim, dim, True, dtype, kernels.linear)
        self.attention = kernels.vision_attention
        self.rotary = kernels.vision_rotary

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list) -> torch.Tensor:
        """segments: (start, count, length) runs of `count` consecutive segments of `length` patches each; segments
        of one run have the same length, so they go through attention as one batch."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # The reference rotates in float32 whatever the tower's dtype (the native kernel in place: q and k are views
        # of the projection's fresh output).
        q, k = self.rotary(q, k, cos, sin)
        covered = sum(count * length for _, count, length in segments)
        if covered != n:
            raise ValueError(f"attention segments cover {covered} of {n} patches")
        o = torch.empty(n, self.num_heads, self.head_dim, dtype=x.dtype, device=x.device)
        for start, count, length in segments:
            end = start + count * length
            self.attention(q[start:end], k[start:end], v[start:end], None, False, o[start:end], count)
        return self.proj(o.view(n, -1))


def frame_segments(grid_thw: list) -> list:
    """Attention segments (start, count, length) in which each image, and each temporal slice of a video, attends
    only to itself."""
    segments = []
    start = 0
    for t, h, w in grid_thw:
        segments.append((start, t, h * w))
        start += t * h * w
    return segments


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, hidden_act: str, dtype: torch.dtype,
                 kernels: Kernels):
        super().__init__()
        self.norm1 = LayerNorm(dim, 1e-6, dtype)
        self.norm2 = LayerNorm(dim, 1e-6, dtype)
        self.attn = VisionAttention(dim, num_heads, dtype, kernels)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Module()
        self.mlp.fc1 = Linear(dim, hidden, True, dtype, kernels.linear)
        self.mlp.fc2 = Linear(hidden, dim, True, dtype, kernels.linear)
        # (quick-GELU's kernel may work in place: fc1's output is this block's own)
        self.act = kernels.quick_gelu if hidden_act == "quick_gelu" else _activation(hidden_act)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Patches [n, C*T*P*P] to [n, embed_dim]: the checkpoint's Conv3d, whose stride equals its kernel over pre-cut
    patches, is a matmul with the flattened kernel."""

    def __init__(self, vc, embed_dim: int, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.dtype = dtype
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
        self.proj = Linear(patch_dim, embed_dim, False, dtype, kernels.linear)
        self.proj.weight.weight_loader = self._load_conv_kernel

    @staticmethod
    def _load_conv_kernel(param, source, name, shard_id=None):
        kernel = source.full()
        if kernel.shape[0] != param.shape[0] or kernel[0].numel() != param.shape[1]:
            raise UserError(f"checkpoint tensor {name} has shape {tuple(kernel.shape)}, the config implies "
                            f"({param.shape[0]}, {param.shape[1]} values per kernel)")
        param.data.copy_(kernel.reshape(param.shape))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.dtype))


class PatchMerger(nn.Module):
    """Each 2x2 group of patches to one language-model token: `ln_q` (the family's norm), then a two-layer MLP."""

    def __init__(self, ln_q: nn.Module, embed_dim: int, merge: int, out_dim: int, dtype: torch.dtype,
                 kernels: Kernels):
        super().__init__()
        self.merged = embed_dim * merge ** 2
        self.ln_q = ln_q
        self.mlp = nn.ModuleList([Linear(self.merged, self.merged, True, dtype, kernels.linear), nn.GELU(),
                                  Linear(self.merged, out_dim, True, dtype, kernels.linear)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).view(-1, self.merged)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, vc, dtype: torch.dtype, device: torch.device, kernels: Kernels):
        super().__init__()
        self.patch_embed = PatchEmbed(vc, vc.embed_dim, dtype, kernels)
        self.rotary = VisionRotaryEmbedding(vc.embed_dim // vc.num_heads, vc.spatial_merge_size, device)
        self.blocks = nn.ModuleList(
            VisionBlock(vc.embed_dim, vc.num_heads, vc.mlp_ratio, vc.hidden_act, dtype, kernels)
            for _ in range(vc.depth))
        self.merger = PatchMerger(LayerNorm(vc.embed_dim, 1e-6, dtype), vc.embed_dim, vc.spatial_merge_size,
                                  vc.hidden_size, dtype, kernels)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list) -> torch.Tensor:
        """pixel_values: [patches, C*T*P*P]; grid_thw: list of (t, h, w). Returns [patches / merge^2, hidden]."""
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary.cos_sin(grid_thw)
        segments = frame_segments(grid_thw)
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x)


# ----------------------------------------------------------------------------------------------- language model

class DecoderLayer(nn.Module):
    def __init__(self, config, layout: HeadLayout, dtype: torch.dtype, upcast_attention: bool, kernels: Kernels):
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = hidden // config.num_attention_heads
        self.num_heads = layout.q_per_rank          # this rank's query heads, zero heads included
        self.num_kv_heads = layout.kv_per_rank
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.upcast_attention = upcast_attention
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps, dtype, kernels.rms_norm)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps, dtype, kernels.rms_norm)
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = QKVParallelLinear(hidden, self.head_dim, layout, True, dtype, kernels.linear)
        first_q, count_q = layout.real_q_heads()
        self.self_attn.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, self.num_heads * self.head_dim,
            (first_q * self.head_dim, count_q * self.head_dim), hidden, dtype, kernels.linear)
        self.decode_attention = kernels.decode_attention
        self.segment_attention = kernels.attention
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = MergedColumnParallelLinear(hidden, config.intermediate_size, ("gate", "up"), dtype,
                                                           kernels.linear)
        size = self.mlp.gate_up_proj.size
        self.mlp.down_proj = RowParallelLinear(config.intermediate_size, size,
                                               (self.mlp.gate_up_proj.start, size), hidden, dtype, kernels.linear)
        self.silu_and_mul = kernels.silu_and_mul
        self.k_cache = self.v_cache = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        n = x.shape[0]
        h = self.input_layernorm(x)
        qkv = self.self_attn.qkv_proj(h).view(n, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        if ctx.is_prefill:
            o = prefill_attention(qkv, self.num_heads, self.num_kv_heads, cos, sin, self.k_cache, self.v_cache, ctx,
                                  self.scale, self.upcast_attention, self.segment_attention)
        else:
            o = self.decode_attention(qkv, self.num_heads, self.num_kv_heads, cos, sin, self.k_cache, self.v_cache,
                                      ctx, self.scale, self.upcast_attention)
        x, h = self.post_attention_layernorm.add_and_norm(x, self.self_attn.o_proj(o.reshape(n, -1)))
        gate, up = self.mlp.gate_up_proj.split(self.mlp.gate_up_proj(h))
        return x + self.mlp.down_proj(self.silu_and_mul(gate, up))


class Qwen2VLForCausalLM(nn.Module):
    """Parameter names follow the checkpoint's classic layout (`model.*`, `visual.*`, `lm_head.*`), with q/k/v and
    gate/up packed; `packed_modules` tells the loader which checkpoint names feed which packed parameter.

    Under tensor parallelism the language model is sharded (heads, MLP columns, vocabulary) while the embedding
    table, the norms and the vision tower are replicated: see docs/ARCHITECTURE.md for why."""

    packed_modules = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", "gate"),
        ".up_proj.": (".gate_up_proj.", "up"),
    }

    vision_tower = VisionTransformer  # a family with another tower (Qwen2.5-VL) names its own

    def __init__(self, config, llm_dtype: torch.dtype, vision_dtype: torch.dtype, device: torch.device,
                 upcast_attention: bool = False, *, kernels: Kernels):
        super().__init__()
        self.config = config
        self.llm_dtype = llm_dtype
        self.kernels = kernels
        self.visual = self.vision_tower(config.vision_config, vision_dtype, device, kernels)
        self.model = nn.Module()
        self.model.embed_tokens = Embedding(config.vocab_size, config.hidden_size, llm_dtype)
        self.head_layout = HeadLayout(config.num_attention_heads, config.num_key_value_heads,
                                      distributed.tp_size(), distributed.tp_rank())
        self.model.layers = nn.ModuleList(
            DecoderLayer(config, self.head_layout, llm_dtype, upcast_attention, kernels)
            for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, llm_dtype, kernels.rms_norm)
        self.tie_word_embeddings = bool(config.tie_word_embeddings)
        self.lm_head = VocabParallelLMHead(config.hidden_size, config.vocab_size, llm_dtype, kernels.linear)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = MRotaryEmbedding(head_dim, config.rope_theta, list(mrope_section(config)), device)

    def after_loading(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def embed(self, input_ids: torch.Tensor, visual_embeds=None) -> torch.Tensor:
        """Token embeddings with visual features in the image / video placeholder rows. visual_embeds: (rows
        [n], features [n, hidden]) or None; the model runner computes the features (model.visual, through its
        vision-encoder cache) for the placeholder rows this step computes."""
        x = self.model.embed_tokens(input_ids)
        if visual_embeds is not None:
            rows, features = visual_embeds
            x.index_copy_(0, rows, features.to(x.dtype))
        return x

    def forward(self, input_ids, positions, logits_rows, ctx: StepContext, visual_embeds=None) -> torch.Tensor:
        """input_ids: [tokens]; positions: [3, tokens]; logits_rows: indices of the rows to compute logits for, or
        None for every row (a decode step's); ctx: the step's paged-cache metadata; visual_embeds: see embed.
        Returns float32 logits [rows, vocab]."""
        x = self.embed(input_ids, visual_embeds)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        # Each layer's own forward, or a fused form of the layers (the native decoder layers on the CPU).
        x = self.kernels.decoder_layer.run_layers(self.model.layers, x, cos, sin, ctx)
        x = self.model.norm(x if logits_rows is None else x.index_select(0, logits_rows))
        return self.lm_head(x).float()
