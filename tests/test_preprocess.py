"""The Preprocessor and media loading: parity with transformers' Qwen2VLProcessor, the video sampling rule,
the pixel budgets, and one clear UserError for each kind of bad input."""

from __future__ import annotations

import logging
import shutil
import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

from atb_models.demo.checkpoint import make_frames, make_image, make_video
from atb_models.errors import UserError
from atb_models.multimodal.media import (
    VIDEO_MIN_PIXELS,
    classify_media,
    load_image,
    load_video,
    video_frame_count,
    video_frame_indices,
    video_frame_max_pixels,
)
from atb_models.multimodal.prompt import Preprocessor

IMAGE_MAX_PIXELS = 28 * 28 * 64  # the tiny checkpoint's preprocessor_config.json


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def parts(checkpoint):
    return SimpleNamespace(
        config=AutoConfig.from_pretrained(checkpoint),
        tokenizer=AutoTokenizer.from_pretrained(checkpoint),
        processor=AutoProcessor.from_pretrained(checkpoint),
    )


@pytest.fixture(scope="module")
def preprocess(checkpoint, parts):
    return Preprocessor(checkpoint, parts.config, parts.tokenizer)


def _saved_image(path, width, height, seed):
    make_image(path, width, height, seed)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("preprocess_media")
    return SimpleNamespace(
        root=root,
        wide=_saved_image(root / "wide.jpg", 320, 240, seed=1),
        tall_thin=_saved_image(root / "tall_thin.png", 30, 600, seed=2),
        video=make_video(root / "clip.mp4", num_frames=9, fps=2.0, width=96, height=64, seed=3),
        frames=make_frames(root / "frames", 3, width=100, height=80, seed=4),
    )


def hf_inputs(parts, request, images=None, videos=None):
    """What transformers' processor makes of the same request (its own chat rendering), as lists and tensors."""
    content = [{"type": "text", "text": v} if k == "text" else {"type": k} for item in request for k, v in item.items()]
    rendered = parts.processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    # Video frames arrive already sized for the video budget; the image budget must not resize them again.
    return parts.processor(
        text=[rendered], images=images, videos=videos, videos_kwargs={"do_resize": False}, return_tensors="pt"
    )


def hf_positions(config, input_ids, image_grid_thw=None, video_grid_thw=None):
    positions, deltas = Qwen2VLForConditionalGeneration.get_rope_index(
        SimpleNamespace(config=config),
        input_ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask=torch.ones_like(input_ids),
    )
    return positions[:, 0], int(deltas[0, 0])


def stack(visuals, kind):
    return torch.cat([v.pixel_values for v in visuals if v.kind == kind])


def grids(visuals, kind):
    return torch.tensor([v.grid_thw for v in visuals if v.kind == kind])


# --- parity with transformers' processor -------------------------------------------------------------------


def test_one_image_matches_the_hf_processor(preprocess, parts, media):
    request = [{"image": str(media.wide)}, {"text": "What is in the picture?"}]
    got = preprocess(request)
    want = hf_inputs(parts, request, images=[Image.open(media.wide).convert("RGB")])

    assert got.token_ids == want["input_ids"][0].tolist()
    assert torch.equal(stack(got.visuals, "image"), want["pixel_values"])
    assert torch.equal(grids(got.visuals, "image"), want["image_grid_thw"])
    visual = got.visuals[0]
    assert visual.pixel_values.dtype == torch.float32 and visual.pixel_values.shape[1] == 3 * 2 * 14 * 14
    assert visual.num_tokens == got.token_ids.count(parts.config.image_token_id)
    assert got.text == f"<image: {media.wide}> What is in the picture?"


def test_two_images_of_different_sizes_including_a_thin_one_match_the_hf_processor(preprocess, parts, media):
    request = [{"image": str(media.wide)}, {"text": "and"}, {"image": str(media.tall_thin)}, {"text": "Compare."}]
    got = preprocess(request)
    images = [Image.open(p).convert("RGB") for p in (media.wide, media.tall_thin)]
    want = hf_inputs(parts, request, images=images)

    assert got.token_ids == want["input_ids"][0].tolist()
    assert torch.equal(stack(got.visuals, "image"), want["pixel_values"])
    assert torch.equal(grids(got.visuals, "image"), want["image_grid_thw"])
    assert got.visuals[1].grid_thw == (1, 42, 2)  # 30x600 -> 28x588: one merged column of 21 tokens
    positions, delta = hf_positions(parts.config, want["input_ids"], want["image_grid_thw"])
    assert torch.equal(got.positions, positions) and got.rope_delta == delta


def test_video_given_as_frames_matches_the_hf_processor_on_the_same_frames(preprocess, parts, media):
    request = [{"video": [str(p) for p in media.frames]}, {"text": "Describe this video."}]
    got = preprocess(request)
    frames, _ = load_video([str(p) for p in media.frames], factor=28)
    want = hf_inputs(parts, request, videos=[frames])

    assert got.token_ids == want["input_ids"][0].tolist()
    assert torch.equal(stack(got.visuals, "video"), want["pixel_values_videos"])
    assert torch.equal(grids(got.visuals, "video"), want["video_grid_thw"])
    assert got.visuals[0].grid_thw[0] == 2  # three frames padded to four: two temporal patches
    assert got.text == "<video: 3 frames> Describe this video."


def test_image_and_video_file_mixed_match_hf_ids_pixels_and_positions(preprocess, parts, media):
    request = [
        {"text": "First"},
        {"video": str(media.video)},
        {"text": "then"},
        {"image": str(media.wide)},
        {"text": "What changed?"},
    ]
    got = preprocess(request)
    frames, _ = load_video(str(media.video))
    want = hf_inputs(parts, request, images=[Image.open(media.wide).convert("RGB")], videos=[frames])

    assert got.token_ids == want["input_ids"][0].tolist()
    assert [v.kind for v in got.visuals] == ["video", "image"]
    assert torch.equal(stack(got.visuals, "image"), want["pixel_values"])
    assert torch.equal(stack(got.visuals, "video"), want["pixel_values_videos"])
    positions, delta = hf_positions(parts.config, want["input_ids"], want["image_grid_thw"], want["video_grid_thw"])
    assert got.positions.dtype == torch.long
    assert torch.equal(got.positions, positions) and got.rope_delta == delta


def test_text_only_request_has_plain_positions(preprocess, parts):
    got = preprocess([{"text": "Hello"}])
    assert got.visuals == []
    assert torch.equal(got.positions, torch.arange(len(got.token_ids)).expand(3, -1))
    assert got.rope_delta == 0


def test_continue_final_message_leaves_the_assistants_answer_open_as_transformers_does(preprocess, parts, media):
    from atb_models import Message
    from atb_models.multimodal.prompt import ToolCall

    conversation = [Message("user", ({"image": str(media.wide)}, {"text": "What is this?"})),
                    Message("assistant", ({"text": "It is a"},))]
    rendered = parts.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}],
        tokenize=False, continue_final_message=True)
    assert rendered.endswith("<|im_start|>assistant\nIt is a")
    want = parts.processor(text=[rendered], images=[Image.open(media.wide).convert("RGB")], return_tensors="pt")
    assert preprocess(conversation, continue_final_message=True).token_ids == want["input_ids"][0].tolist()
    answered = preprocess(conversation).token_ids  # a new assistant turn after it
    assert parts.tokenizer.decode(answered).endswith("It is a<|im_end|>\n<|im_start|>assistant\n")
    calls = (ToolCall("call_1", "get_time", "{}"),)
    for ends_wrongly in (conversation[:1], [conversation[0], Message("assistant", ({"image": str(media.wide)},))],
                         [conversation[0], Message("assistant", (), calls)],  # (only calls: no content)
                         [conversation[0], Message("assistant", ({"text": "Let me look."},), calls)]):
        with pytest.raises(UserError, match="must be the assistant's, ending in text"):
            preprocess(ends_wrongly, continue_final_message=True)


def test_chat_template_is_read_from_chat_template_json_when_the_tokenizer_has_none(checkpoint, parts, preprocess):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.chat_template = None
    without = Preprocessor(checkpoint, parts.config, tokenizer)
    request = [{"text": "Hello"}]
    assert without(request).token_ids == preprocess(request).token_ids


# --- image sizing ------------------------------------------------------------------------------------------


def test_checkpoint_max_pixels_bound_the_image_grid(preprocess, media):
    (visual,) = preprocess([{"image": str(media.wide)}]).visuals
    t, h, w = visual.grid_thw
    assert h * w * 14 * 14 <= IMAGE_MAX_PIXELS


def test_max_pixels_argument_overrides_the_checkpoint(checkpoint, parts, media):
    small = Preprocessor(checkpoint, parts.config, parts.tokenizer, max_pixels=28 * 28 * 4)
    (visual,) = small([{"image": str(media.wide)}]).visuals
    assert visual.num_tokens <= 4


def same_prompt(got, want) -> bool:
    """Token ids, every visual's pixels, grid and content hash, and positions alike."""
    return (got.token_ids == want.token_ids and [v.grid_thw for v in got.visuals] == [v.grid_thw for v in want.visuals]
            and all(torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(got.visuals, want.visuals))
            and [v.content_hash for v in got.visuals] == [v.content_hash for v in want.visuals]
            and torch.equal(got.positions, want.positions))


@pytest.mark.parametrize("bounds", [{"max_pixels": 28 * 28 * 4}, {"min_pixels": 28 * 28 * 48},
                                    {"min_pixels": 28 * 28 * 2, "max_pixels": 28 * 28 * 6}],
                         ids=["max", "min", "both"])
def test_an_image_items_own_bounds_give_what_the_flags_give(checkpoint, parts, preprocess, media, bounds):
    """qwen-vl-utils' per-image min_pixels / max_pixels: the item's prompt is the one a Preprocessor built with
    --min_pixels / --max_pixels of the same values makes (the processor's resize included, not only the grid)."""
    flags = Preprocessor(checkpoint, parts.config, parts.tokenizer, **bounds)
    # (the thin one fits no ceiling of a few tokens)
    for image in (media.tall_thin, media.wide) if "max_pixels" not in bounds else (media.wide,):
        got = preprocess([{"image": str(image), **bounds}, {"text": "What is this?"}])
        want = flags([{"image": str(image)}, {"text": "What is this?"}])
        assert same_prompt(got, want)
    default = preprocess([{"image": str(media.wide)}])
    assert default.visuals[0].grid_thw != got.visuals[0].grid_thw or "min_pixels" in bounds
    # The shared processor is never changed: the next request without bounds gets the checkpoint's.
    assert (preprocess.image_processor.min_pixels, preprocess.image_processor.max_pixels) == (56 * 56,
                                                                                             IMAGE_MAX_PIXELS)
    assert same_prompt(preprocess([{"image": str(media.wide)}]), default)


def test_a_video_items_max_pixels_bounds_its_frames_as_the_flag_does(checkpoint, parts, preprocess, media):
    ceiling = 28 * 28 * 4
    flags = Preprocessor(checkpoint, parts.config, parts.tokenizer, max_pixels=ceiling)
    for video in (str(media.video), [str(p) for p in media.frames]):
        got = preprocess([{"video": video, "max_pixels": ceiling, "fps": 1.0}, {"text": "Describe."}])
        want = flags([{"video": video, "fps": 1.0}, {"text": "Describe."}])
        assert same_prompt(got, want)
        assert got.visuals[0].grid_thw[1] * got.visuals[0].grid_thw[2] * 14 * 14 <= ceiling
        assert got.visuals[0].num_tokens < preprocess([{"video": video, "fps": 1.0}]).visuals[0].num_tokens


def test_missing_preprocessor_config_falls_back_to_class_defaults_with_a_warning(checkpoint, parts, tmp_path, caplog):
    copy = tmp_path / "no_preprocessor_config"
    shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("preprocessor_config.json", "*.safetensors"))
    with caplog.at_level(logging.WARNING):
        fallback = Preprocessor(copy, parts.config, parts.tokenizer)
    assert "preprocessor_config.json" in caplog.text
    assert fallback.image_processor.max_pixels == 28 * 28 * 1280


@pytest.mark.parametrize(
    "name, width, height, reason",
    [("sliver.png", 20, 600, "larger than factor"), ("ribbon.png", 6000, 28, "aspect ratio")],
)
def test_image_too_thin_or_too_elongated_is_refused_like_hf_but_as_a_user_error(
    preprocess, parts, tmp_path, name, width, height, reason
):
    path = tmp_path / name
    make_image(path, width, height, seed=5)
    with pytest.raises(ValueError, match=reason):
        parts.processor.image_processor(images=[Image.open(path)])
    with pytest.raises(UserError, match=f"{name}.*{reason}"):
        preprocess([{"image": str(path)}])


# --- video frame count rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "total, native_fps, fps, max_frames, expected",
    [
        (8, 2.0, 0.5, 768, 4),  # a short clip still gets the minimum of 4 frames
        (30 * 600, 30.0, 0.5, 768, 300),  # ten minutes at one frame per two seconds
        (30 * 600, 30.0, 2.0, 768, 768),  # twenty minutes' worth at 2 fps: capped at 768
        (30 * 600, 30.0, 0.5, 64, 64),  # capped by a smaller video_max_frames
        (30 * 600, 30.0, 0.5, 65, 64),  # an odd cap is floored to pairs
        (5, 1.0, 0.5, 768, 4),  # an odd total: min 4 fits
        (3, 1.0, 0.5, 768, 2),  # fewer frames than the minimum: as many whole pairs as there are
        (7, 1.0, 0.8, 768, 4),  # 5.6 frames: floored to a pair count
        (25, 25.0, 0.5, 768, 4),
    ],
)
def test_video_frame_count(total, native_fps, fps, max_frames, expected):
    assert video_frame_count(total, native_fps, fps, max_frames, source="clip.mp4") == expected


def test_single_frame_video_is_a_user_error_naming_file_and_count():
    with pytest.raises(UserError, match=r"clip\.mp4 has 1 frame"):
        video_frame_count(1, 30.0, 0.5, 768, source="clip.mp4")


def test_frame_indices_spread_evenly_with_both_ends():
    assert video_frame_indices(10, 4) == [0, 3, 6, 9]
    assert video_frame_indices(9, 4) == [0, 3, 5, 8]  # 2.67 and 5.33 round to 3 and 5
    assert video_frame_indices(4, 4) == [0, 1, 2, 3]


def test_video_file_keeps_the_sampled_frames_in_order(media):
    frames, sample_fps = load_video(str(media.video), fps=0.5)
    # 9 frames at 2 fps = 4.5 s -> 2.25 frames at 0.5 fps -> the minimum 4, at indices 0, 3, 5, 8.
    assert frames.shape[0] == 4 and frames.dtype == np.uint8
    assert sample_fps == pytest.approx(4 / 9 * 2.0)
    capture = cv2.VideoCapture(str(media.video))
    decoded = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    height, width = frames.shape[1:3]
    for got, index in zip(frames, [0, 3, 5, 8]):
        expected = np.asarray(Image.fromarray(decoded[index]).resize((width, height), Image.BICUBIC))
        assert np.array_equal(got, expected)


def test_long_clip_is_capped_by_max_frames(tmp_path):
    path = make_video(tmp_path / "long.mp4", num_frames=40, fps=10.0, width=64, height=48, seed=7)
    frames, _ = load_video(str(path), fps=5.0, max_frames=7)
    assert frames.shape[0] == 6


def test_a_clip_whose_header_understates_its_frames_is_sampled_over_all_of_them(tmp_path):
    # 40 frames at 2 fps (20 s), frame i all of brightness 6 * i, in an AVI whose headers claim 8 frames (4 s).
    path = tmp_path / "understated.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 2.0, (64, 48))
    for i in range(40):
        writer.write(np.full((48, 64, 3), 6 * i, dtype=np.uint8))
    writer.release()
    data = bytearray(path.read_bytes())
    total_frames = data.find(b"avih") + 8 + 16  # MainAVIHeader.dwTotalFrames
    stream_length = data.find(b"strh") + 8 + 32  # AVIStreamHeader.dwLength
    for offset in (total_frames, stream_length):
        assert struct.unpack_from("<I", data, offset) == (40,)
        struct.pack_into("<I", data, offset, 8)
    path.write_bytes(data)
    capture = cv2.VideoCapture(str(path))
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 8
    capture.release()

    frames, sample_fps = load_video(str(path), fps=0.5)
    # 20 s at 0.5 fps: 10 frames from the whole clip (not 4 from its first 8 frames), the last frame included.
    assert frames.shape[0] == 10 and sample_fps == pytest.approx(0.5)
    assert abs(int(frames[-1].mean()) - 6 * 39) <= 3


def test_frame_list_is_padded_to_pairs_and_sized_by_its_first_frame(media, tmp_path):
    odd_size = make_image(tmp_path / "odd.png", 200, 50, seed=8)
    frames, _ = load_video([str(media.frames[0]), odd_size, str(media.frames[2])], fps=0.5)
    assert frames.shape[0] == 4
    assert np.array_equal(frames[2], frames[3])
    alone, _ = load_video([str(media.frames[0])])
    assert frames.shape[1:] == alone.shape[1:]


# --- video pixel budget -------------------------------------------------------------------------------------


def test_frame_pixel_budget():
    assert video_frame_max_pixels(4) == 768 * 28 * 28  # few frames: the per-frame ceiling
    assert video_frame_max_pixels(100) == pytest.approx(24576 * 28 * 28 / 100 * 2)  # the total shared out
    assert video_frame_max_pixels(768) == int(1.05 * VIDEO_MIN_PIXELS)  # many frames: the floor
    assert video_frame_max_pixels(4, max_pixels=28 * 28 * 50) == 28 * 28 * 50  # the caller's cap


def test_frames_are_sized_within_budget_in_multiples_of_28(tmp_path):
    paths = make_frames(tmp_path / "big", 2, width=1280, height=960, seed=9)
    frames, _ = load_video([str(p) for p in paths])
    _, height, width, _ = frames.shape
    assert height % 28 == 0 and width % 28 == 0
    assert height * width <= 768 * 28 * 28
    capped, _ = load_video([str(p) for p in paths], max_pixels=28 * 28 * 50)
    assert capped.shape[1] * capped.shape[2] <= 28 * 28 * 50


def test_small_frames_are_enlarged_to_the_video_minimum(media):
    frames, _ = load_video([str(p) for p in media.frames])
    assert frames.shape[1] * frames.shape[2] >= VIDEO_MIN_PIXELS


# --- classify_media ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [("a.jpg", "image"), ("b.JPEG", "image"), ("c.png", "image"),
                                        ("d.Bmp", "image"), ("e.mp4", "video"), ("f.WMV", "video"), ("g.avi", "video")])
def test_classify_media_by_extension(name, kind):
    assert classify_media(name) == kind


def test_unsupported_extension_names_type_file_and_choices():
    expected = r"unsupported file type '\.gif' for dir/anim\.gif: images .*\.jpg.*videos .*\.mp4"
    with pytest.raises(UserError, match=expected):
        classify_media("dir/anim.gif")


# --- bad input ---------------------------------------------------------------------------------------------


def test_missing_image_file(preprocess, tmp_path):
    with pytest.raises(UserError, match="not found.*nowhere.jpg"):
        preprocess([{"image": str(tmp_path / "nowhere.jpg")}])


def test_corrupt_image_bytes(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"this is not a jpeg at all")
    with pytest.raises(UserError, match="broken.jpg"):
        load_image(path)


def test_truncated_image(media, tmp_path):
    data = media.wide.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated.jpg"):
        load_image(path)


def _png_header_only(path, width, height):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_001, 20_000])  # over the kit's limit; over PIL's own refusal as well
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    _png_header_only(path, side, side)
    with pytest.raises(UserError, match="bomb.png.*limit"):
        load_image(path)


def test_corrupt_video(preprocess, tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match="broken.mp4"):
        preprocess([{"video": str(path)}])


def test_missing_video_file(tmp_path):
    with pytest.raises(UserError, match="not found.*gone.mp4"):
        load_video(str(tmp_path / "gone.mp4"))


def test_one_frame_video_file_is_a_user_error(tmp_path):
    path = make_video(tmp_path / "still.mp4", num_frames=1, fps=2.0, width=64, height=48)
    with pytest.raises(UserError, match="still.mp4 has 1 frame"):
        load_video(str(path))


@pytest.mark.parametrize(
    "request_, number",
    [
        ([{"image": "a.jpg", "text": "both"}], 1),
        ([{"text": "fine"}, {"audio": "a.wav"}], 2),
        ([{"text": "fine"}, {}], 2),
        (["just a string"], 1),
    ],
)
def test_bad_item_keys(preprocess, request_, number):
    with pytest.raises(UserError, match=f"request item {number} must hold exactly one of image, video, text"):
        preprocess(request_)


def test_empty_request(preprocess):
    with pytest.raises(UserError, match="empty"):
        preprocess([])


def test_text_smuggling_a_vision_placeholder_is_refused(preprocess):
    with pytest.raises(UserError, match="placeholder"):
        preprocess([{"text": "look: <|image_pad|>"}])


def test_a_frame_list_longer_than_video_max_frames_is_thinned_evenly(tmp_path):
    from atb_models.demo.checkpoint import make_frames
    from atb_models.multimodal.media import load_video

    frames = make_frames(tmp_path, 10, width=56, height=56, seed=1)
    video, _ = load_video([str(f) for f in frames], max_frames=4)
    assert video.shape[0] == 4
    full, _ = load_video([str(f) for f in frames], max_frames=768)
    assert full.shape[0] == 10
    assert (video[0] == full[0]).all() and (video[-1] == full[-1]).all()


def test_a_lone_surrogate_in_the_tools_or_a_calls_arguments_is_a_user_error(checkpoint, parts):
    """JSON's "\\ud800" alone reads as a lone surrogate, which the tokenizer cannot take (a TypeError: the server's
    500): a message's text is checked as an item, the tools and the calls' arguments only reach the template."""
    from pathlib import Path

    from atb_models.multimodal.prompt import Message, ToolCall

    template = (Path(__file__).parent.parent / "examples/chat_templates/qwen2_vl_tool_use.jinja").read_text()
    tool_use = Preprocessor(checkpoint, parts.config, parts.tokenizer, chat_template=template)
    tool = {"type": "function", "function": {"name": "f", "description": "caf\ud800"}}
    with pytest.raises(UserError, match="lone surrogate"):
        tool_use([{"text": "hi"}], tools=[tool])
    called = [Message("user", ({"text": "hi"},)),
              Message("assistant", (), (ToolCall("a", "f", '{"x": "\ud800"}'),)),
              Message("tool", ({"text": "ok"},), (), "a")]
    with pytest.raises(UserError, match="lone surrogate"):
        tool_use(called)
