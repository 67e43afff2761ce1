"""M-RoPE positions for a Qwen2-VL prompt: the one place they are computed.

Text tokens get the same position on all three axes (temporal, height, width). A vision block gets its
(t, h, w) index over the merged grid (T, H/m, W/m), offset to start right after the preceding text; text after a
block continues from the block's largest position + 1. So a prompt of L tokens ends at position L - 1 + delta,
with delta <= 0 whenever an image's block is more than one row or column.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Grids = Union[torch.Tensor, Sequence[Sequence[int]], None]


def _grid_list(grids: Grids) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    rows = torch.as_tensor(grids, dtype=torch.long).reshape(-1, 3).tolist()
    return [tuple(row) for row in rows]


def _temporal_index(t: int, seconds_per_grid: float | None, tokens_per_second: float | None) -> torch.Tensor:
    """The temporal position of each of a block's t grid steps: the step number (Qwen2-VL), or the step's time in
    seconds times `tokens_per_second`, truncated (Qwen2.5-VL's absolute time; computed in float32 as transformers
    does, so positions agree to the unit)."""
    steps = torch.arange(t)
    if tokens_per_second is None:
        return steps
    return (steps * torch.tensor(seconds_per_grid, dtype=torch.float32) * tokens_per_second).long()


def _block_positions(t_steps: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[3, t*h*w] grid indices of one merged vision block, in the order its tokens appear (t, then rows, then cols);
    t_steps holds the temporal position of each of its t grid steps."""
    t = t_steps.numel()
    t_index = t_steps.repeat_interleave(h * w)
    h_index = torch.arange(h).repeat_interleave(w).repeat(t)
    w_index = torch.arange(w).repeat(t * h)
    return torch.stack([t_index, h_index, w_index])


def rope_index(
    input_ids: torch.Tensor | Sequence[int],
    image_grid_thw: Grids,
    video_grid_thw: Grids,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
    video_seconds_per_grid: Sequence[float] | None = None,
    tokens_per_second: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Positions [3, L] (int64) and rope delta (max position + 1 - L) of one unpadded prompt.

    Equal to transformers 4.46 `Qwen2VLForConditionalGeneration.get_rope_index` for a batch of one. Each
    `vision_start` followed by an image (video) pad token opens a block that takes the next image (video) grid,
    in order of appearance; the grids are (t, h, w) in patches, as the image processor returns them.

    With `tokens_per_second` (Qwen2.5-VL), a video's grid step t sits at temporal position
    int(t * video_seconds_per_grid[i] * tokens_per_second), as transformers 4.51's Qwen2.5-VL `get_rope_index`
    computes it; images keep t = 0.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    length = ids.numel()
    images, videos = _grid_list(image_grid_thw), _grid_list(video_grid_thw)

    starts = torch.nonzero(ids[:-1] == vision_start_token_id).flatten() + 1
    kinds = ids[starts].tolist()
    block_starts = [(s, k) for s, k in zip(starts.tolist(), kinds) if k in (image_token_id, video_token_id)]

    pieces: list[torch.Tensor] = []
    next_pos = 0  # the position the next text token gets: previous maximum + 1
    cursor = 0  # index of the first token not yet given a position
    image_i = video_i = 0
    if tokens_per_second is not None and len(video_seconds_per_grid or ()) != len(videos):
        raise ValueError(f"{len(videos)} video grids but {len(video_seconds_per_grid or ())} seconds per grid step")
    for start, kind in block_starts:
        if kind == image_token_id:
            if image_i >= len(images):
                raise ValueError(f"the prompt has more image blocks than the {len(images)} image grids given")
            t, h, w = images[image_i]
            t_steps = torch.arange(t)
            image_i += 1
        else:
            if video_i >= len(videos):
                raise ValueError(f"the prompt has more video blocks than the {len(videos)} video grids given")
            t, h, w = videos[video_i]
            seconds = video_seconds_per_grid[video_i] if tokens_per_second is not None else None
            t_steps = _temporal_index(t, seconds, tokens_per_second)
            video_i += 1
        h, w = h // spatial_merge_size, w // spatial_merge_size
        if start + t * h * w > length:
            raise ValueError(f"a vision block of {t * h * w} tokens at index {start} runs past the prompt's {length}")
        text_len = start - cursor
        pieces.append(torch.arange(text_len).expand(3, -1) + next_pos)
        pieces.append(_block_positions(t_steps, h, w) + next_pos + text_len)
        next_pos += text_len + max(int(t_steps[-1]) + 1, h, w)
        cursor = start + t * h * w
    pieces.append(torch.arange(length - cursor).expand(3, -1) + next_pos)
    next_pos += length - cursor

    positions = torch.cat(pieces, dim=1)
    return positions, next_pos - length
