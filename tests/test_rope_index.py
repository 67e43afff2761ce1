"""rope_index must equal transformers 4.46 Qwen2VLForConditionalGeneration.get_rope_index, deltas included."""

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from atb_models.engine.sampling_params import SamplingParams
from atb_models.engine.sequence import Sequence
from atb_models.multimodal.prompt import ProcessedPrompt
from atb_models.multimodal.rope_index import rope_index

# The 4.46 config class has no defaults for these ids: they come from a checkpoint's config.json (Qwen2-VL's values).
CONFIG = Qwen2VLConfig(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
)
IMAGE, VIDEO = CONFIG.image_token_id, CONFIG.video_token_id
START, END = CONFIG.vision_start_token_id, CONFIG.vision_end_token_id
MERGE = CONFIG.vision_config.spatial_merge_size


def hf_rope_index(ids, image_grids, video_grids):
    # get_rope_index only reads self.config, so a stub stands in for the (large) model.
    # Its multimodal branch indexes attention_mask unconditionally, so pass an all-ones one.
    stub = SimpleNamespace(config=CONFIG)
    positions, deltas = Qwen2VLForConditionalGeneration.get_rope_index(
        stub,
        torch.tensor([ids]),
        torch.tensor(image_grids) if image_grids else None,
        torch.tensor(video_grids) if video_grids else None,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
    )
    return positions[:, 0, :], int(deltas[0, 0])


def text(n, base=100):
    return list(range(base, base + n))


def block(kind, grid):
    t, h, w = grid
    return [START] + [kind] * (t * h * w // MERGE**2) + [END]


def assert_same_as_hf(ids, image_grids=(), video_grids=()):
    image_grids, video_grids = list(image_grids), list(video_grids)
    positions, delta = rope_index(
        ids,
        image_grids or None,
        video_grids or None,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        spatial_merge_size=MERGE,
    )
    expected, expected_delta = hf_rope_index(ids, image_grids, video_grids)
    assert positions.dtype == torch.long
    assert positions.shape == (3, len(ids))
    assert torch.equal(positions, expected)
    assert delta == expected_delta
    assert delta == int(positions.max()) + 1 - len(ids)
    return positions, delta


def test_text_only_is_arange_on_three_axes_with_zero_delta():
    ids = text(7)
    positions, delta = assert_same_as_hf(ids)
    assert torch.equal(positions, torch.arange(7).expand(3, -1))
    assert delta == 0


def test_one_image_between_text():
    grid = (1, 16, 16)
    ids = text(5) + block(IMAGE, grid) + text(4)
    _, delta = assert_same_as_hf(ids, [grid])
    assert delta == -(64 - 8)  # 8x8 merged tokens: 64 tokens spanning 8 positions


def test_two_images_of_different_grids():
    grids = [(1, 4, 6), (1, 10, 2)]
    ids = text(3) + block(IMAGE, grids[0]) + text(2) + block(IMAGE, grids[1]) + text(5)
    assert_same_as_hf(ids, grids)


def test_adjacent_images_without_text_between():
    grids = [(1, 4, 4), (1, 6, 2)]
    ids = text(2) + block(IMAGE, grids[0]) + block(IMAGE, grids[1]) + text(1)
    assert_same_as_hf(ids, grids)


def test_video_with_several_temporal_patches():
    grid = (3, 4, 4)
    ids = text(4) + block(VIDEO, grid) + text(5)
    positions, _ = assert_same_as_hf(ids, video_grids=[grid])
    first = 4 + 1  # the video's first pad token
    assert positions[0, first : first + 12].tolist() == [4 + 1 + t for t in (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2)]


def test_image_and_video_mixed_in_order_of_appearance():
    images = [(1, 6, 4), (1, 2, 8)]
    videos = [(2, 4, 4), (4, 2, 6)]
    ids = (
        text(3)
        + block(VIDEO, videos[0])
        + text(2)
        + block(IMAGE, images[0])
        + block(VIDEO, videos[1])
        + text(1)
        + block(IMAGE, images[1])
        + text(6)
    )
    assert_same_as_hf(ids, images, videos)


def test_odd_thin_grid():
    grid = (1, 2, 34)
    ids = text(3) + block(IMAGE, grid) + text(3)
    positions, delta = assert_same_as_hf(ids, [grid])
    assert delta == 17 - 17  # one row of 17 tokens spans 17 positions


def test_prompt_ending_in_a_vision_block():
    grid = (2, 6, 6)
    ids = text(2) + [START] + [VIDEO] * (2 * 3 * 3)
    assert_same_as_hf(ids, video_grids=[grid])


def test_too_few_grids_is_an_error():
    ids = text(2) + block(IMAGE, (1, 4, 4)) + block(IMAGE, (1, 4, 4))
    with pytest.raises(ValueError, match="image"):
        rope_index(ids, [(1, 4, 4)], None, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START)


def test_decode_positions_continue_after_the_prompt_shifted_by_delta():
    grid = (1, 8, 8)
    ids = text(3) + block(IMAGE, grid) + text(2)
    positions, delta = rope_index(
        ids, [grid], None, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START
    )
    seq = Sequence(0, ProcessedPrompt(ids, [], positions, delta, ""), SamplingParams(max_tokens=8), max_tokens=8)
    for token in range(5):
        seq.append_token(token)
    # What the runner feeds the model: the prompt's own positions, then generated tokens after its largest one,
    # the same on all three axes.
    assert torch.equal(seq.positions(0, len(ids)), positions)
    after = int(positions.max()) + 1 + torch.arange(5)
    assert torch.equal(seq.positions(len(ids), len(ids) + 5), after.expand(3, -1))
    assert torch.equal(seq.positions(len(ids) - 2, len(ids) + 1)[:, 2], after[:1].expand(3))
    assert seq.decode_position() == int(after[-1])  # a decode step's, the latest token's, as a number
