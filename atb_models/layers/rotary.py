"""Rotary position embeddings: M-RoPE for the language model, 2-D rotary for the vision tower.

Both compute cos/sin once per forward pass (float32, as the reference does) and every layer reuses them.
"""
import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim], already in the dtype the rotation runs in."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class MRotaryEmbedding:
    """Qwen2-VL's multimodal rotary: the head dimension is cut into [t, h, w] frequency bands (`mrope_section`),
    each band rotated by its own axis of the 3-D position. Text tokens carry equal positions on all axes, so for
    them this is ordinary RoPE."""

    def __init__(self, head_dim: int, rope_theta: float, mrope_section: list, device: torch.device):
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        self.inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        # For every frequency, which position axis (0 = t, 1 = h, 2 = w) drives it.
        axis = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(mrope_section)])
        self.axis = axis.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions: [3, tokens] int64 -> cos, sin: [tokens, head_dim] in `dtype`."""
        pos = positions.to(torch.float32)
        # freqs[j, n] = pos[axis[j], n] * inv_freq[j]
        freqs = pos.index_select(0, self.axis) * self.inv_freq[:, None]
        freqs = freqs.t()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class VisionRotaryEmbedding:
    """2-D rotary of the vision tower: half of each head's frequencies follow the patch row, half the column,
    with patches listed in 2x2 merge windows (the order the processor emits them in)."""

    def __init__(self, head_dim: int, spatial_merge_size: int, device: torch.device, theta: float = 10000.0):
        dim = head_dim // 2
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        self.merge = spatial_merge_size
        self.device = device

    def position_ids(self, grid_thw: list) -> torch.Tensor:
        """[patches, 2] (row, column) of every patch, in processor order."""
        m = self.merge
        ids = []
        for t, h, w in grid_thw:
            rows = torch.arange(h, device=self.device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            cols = torch.arange(w, device=self.device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            rc = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)
            ids.append(rc.repeat(t, 1))
        return torch.cat(ids, dim=0)

    def cos_sin(self, grid_thw: list):
        """cos, sin: [patches, head_dim] float32."""
        pos = self.position_ids(grid_thw)
        max_side = max(max(h, w) for _, h, w in grid_thw)
        table = torch.outer(torch.arange(max_side, device=self.device, dtype=torch.float32), self.inv_freq)
        freqs = table[pos].flatten(1)  # [patches, head_dim/2]: row frequencies then column frequencies
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()
