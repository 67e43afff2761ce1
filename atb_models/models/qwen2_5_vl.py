"""Qwen2.5-VL: Qwen2-VL's language model with a windowed vision tower.

What differs from Qwen2-VL (atb_models/models/qwen2_vl.py, whose language model, attention and loading this reuses):
- the vision blocks use RMSNorm and a gated SiLU MLP (gate/up/down, with biases), the merger's `ln_q` is an RMSNorm;
- patches are reordered window by window (`window_size` pixels square) before the blocks and restored after the
  merger; blocks in `fullatt_block_indexes` attend over each whole image (each temporal slice of a video), the
  others within their window;
- video positions carry absolute time (multimodal/rope_index.py), which needs nothing from the model itself.

transformers' `modeling_qwen2_5_vl.py` (4.51) is the reference; its classes are not in the kit's transformers pin,
so the config is read by the kit's own config classes below and the parity tests run transformers in a venv of
their own (atb_models.oracle).
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, Qwen2VLConfig

from atb_models.kernels import Kernels
from atb_models.layers.linear import Linear, MergedReplicatedLinear
from atb_models.layers.norm import RMSNorm
from atb_models.layers.rotary import VisionRotaryEmbedding
from atb_models.models.qwen2_vl import (PatchEmbed, PatchMerger, Qwen2VLForCausalLM, VisionAttention, _activation,
                                        frame_segments)


class Qwen2_5_VLVisionConfig(PretrainedConfig):
    """config.json's vision_config of a Qwen2.5-VL checkpoint (transformers 4.51's fields and defaults).
    `embed_dim` reads `hidden_size`, the name Qwen2-VL's tower used for its width."""

    model_type = "qwen2_5_vl"
    attribute_map = {"embed_dim": "hidden_size"}

    def __init__(self, depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                 in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=4,
                 window_size=112, out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31), **kwargs):
        super().__init__(**kwargs)
        self.depth = depth
        self.hidden_size = hidden_size
        self.hidden_act = hidden_act
        self.intermediate_size = intermediate_size
        self.num_heads = num_heads
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.temporal_patch_size = temporal_patch_size
        self.tokens_per_second = tokens_per_second
        self.window_size = window_size
        self.out_hidden_size = out_hidden_size
        self.fullatt_block_indexes = list(fullatt_block_indexes)


class Qwen2_5_VLConfig(Qwen2VLConfig):
    """A Qwen2.5-VL config.json: the language model's fields are Qwen2-VL's (rope_scaling in either form, with
    "type" "mrope" or "default"), the vision tower's are Qwen2_5_VLVisionConfig's."""

    model_type = "qwen2_5_vl"

    def __init__(self, vision_config=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(vision_config, Qwen2_5_VLVisionConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = Qwen2_5_VLVisionConfig(**(vision_config or {}))


def window_order(grid_thw: list, spatial_merge_size: int, window_merged: int) -> tuple[torch.Tensor, list]:
    """The window order of the merged units (2x2 patch groups) of a step's visuals, and the windows' lengths.

    Each temporal slice of each visual is cut into squares of `window_merged` units (the last row and column of
    squares may be smaller); units are listed window by window, row-major inside a window. Returns (order: the
    processor-order index of each unit in window order, [units per window])."""
    m = spatial_merge_size
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        gh, gw = h // m, w // m
        units = torch.arange(t * gh * gw).view(t, gh, gw)
        pad_h, pad_w = -gh % window_merged, -gw % window_merged
        padded = F.pad(units, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (gh + pad_h) // window_merged, (gw + pad_w) // window_merged
        windows = padded.view(t, nh, window_merged, nw, window_merged).permute(0, 1, 3, 2, 4)
        windows = windows.reshape(t * nh * nw, window_merged * window_merged)
        order.append(windows[windows >= 0] + offset)
        lengths.extend((windows >= 0).sum(1).tolist())
        offset += t * gh * gw
    return torch.cat(order), lengths


def window_segments(lengths: list, unit: int) -> list:
    """Attention segments (start, count, length) in patches for windows of `lengths` merged units, consecutive
    windows of one length joined into one run (one batched attention call)."""
    segments, start = [], 0
    for length in lengths:
        length *= unit
        if segments and segments[-1][2] == length and segments[-1][0] + segments[-1][1] * length == start:
            first, count, _ = segments[-1]
            segments[-1] = (first, count + 1, length)
        else:
            segments.append((start, 1, length))
        start += length
    return segments


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, intermediate_size: int, hidden_act: str, dtype: torch.dtype,
                 kernels: Kernels):
        super().__init__()
        self.norm1 = RMSNorm(dim, 1e-6, dtype, kernels.rms_norm)
        self.norm2 = RMSNorm(dim, 1e-6, dtype, kernels.rms_norm)
        self.attn = VisionAttention(dim, num_heads, dtype, kernels)
        self.mlp = nn.Module()
        # The checkpoint's gate_proj and up_proj, packed by the model's packed_modules as the language model's are.
        self.mlp.gate_up_proj = MergedReplicatedLinear(dim, intermediate_size, ("gate", "up"), True, dtype,
                                                       kernels.linear)
        self.mlp.down_proj = Linear(intermediate_size, dim, True, dtype, kernels.linear)
        self.act = _activation(hidden_act)
        # SiLU's product with up in one pass where a kernel has it (the language model's, kernels.activation)
        self.silu_and_mul = kernels.silu_and_mul if hidden_act == "silu" else None

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        h = self.norm2(x)
        gate, up = self.mlp.gate_up_proj.split(self.mlp.gate_up_proj(h))
        activated = self.silu_and_mul(gate, up) if self.silu_and_mul is not None else self.act(gate) * up
        return x + self.mlp.down_proj(activated)


class VisionTransformer(nn.Module):
    def __init__(self, vc, dtype: torch.dtype, device: torch.device, kernels: Kernels):
        super().__init__()
        self.merge = vc.spatial_merge_size
        self.window_merged = vc.window_size // vc.spatial_merge_size // vc.patch_size
        self.full_attention_blocks = frozenset(vc.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(vc, vc.hidden_size, dtype, kernels)
        self.rotary = VisionRotaryEmbedding(vc.hidden_size // vc.num_heads, vc.spatial_merge_size, device)
        self.blocks = nn.ModuleList(
            VisionBlock(vc.hidden_size, vc.num_heads, vc.intermediate_size, vc.hidden_act, dtype, kernels)
            for _ in range(vc.depth))
        self.merger = PatchMerger(RMSNorm(vc.hidden_size, 1e-6, dtype, kernels.rms_norm), vc.hidden_size,
                                  vc.spatial_merge_size, vc.out_hidden_size, dtype, kernels)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list) -> torch.Tensor:
        """pixel_values: [patches, C*T*P*P]; grid_thw: list of (t, h, w). Returns [patches / merge^2, hidden] in
        the processor's order."""
        unit = self.merge ** 2
        order, lengths = window_order(grid_thw, self.merge, self.window_merged)
        order = order.to(pixel_values.device)

        def to_windows(t: torch.Tensor) -> torch.Tensor:
            return t.view(-1, unit, t.shape[-1])[order].view(-1, t.shape[-1])

        x = to_windows(self.patch_embed(pixel_values))
        cos, sin = (to_windows(t) for t in self.rotary.cos_sin(grid_thw))
        # Windows never cross a temporal slice, so each slice stays contiguous in window order.
        full, windowed = frame_segments(grid_thw), window_segments(lengths, unit)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in self.full_attention_blocks else windowed)
        return self.merger(x)[torch.argsort(order)]


class Qwen2_5_VLForCausalLM(Qwen2VLForCausalLM):
    """Qwen2-VL's language model, sharding and loading, with the Qwen2.5-VL vision tower (replicated on every
    rank, as Qwen2-VL's)."""

    vision_tower = VisionTransformer
