"""Hardening of media loading and preprocessing (issue 12): files named on the command line checked before the
model loads, deep images scaled rather than clipped, an image the model cannot take failing only its own request,
and preprocessing settings refused in one line that names the flag."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from transformers import AutoConfig, AutoTokenizer

from atb_models import LLM, SamplingParams
from atb_models.demo.checkpoint import make_image
from atb_models.errors import UserError
from atb_models.multimodal.media import load_image, probe_media_file
from atb_models.multimodal.prompt import Preprocessor

TOKEN_PIXELS = 28 * 28  # one merged token of the tiny checkpoint


# ------------------------------------------------------------------------------------------ probe_media_file
def test_probe_names_the_kind_of_a_good_image_and_video(sample_image_path, sample_video_path, tmp_path):
    png = tmp_path / "a.png"
    make_image(png, 40, 30)
    assert probe_media_file(sample_image_path) == "image"
    assert probe_media_file(str(png)) == "image"
    assert probe_media_file(sample_video_path) == "video"


def test_probe_follows_a_symlink_to_a_file(sample_image_path, tmp_path):
    link = tmp_path / "link.jpg"
    link.symlink_to(sample_image_path)
    assert probe_media_file(link) == "image"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing.jpg", r"not found: .*missing\.jpg"),
        (lambda d: (d / "dir.png").mkdir() or d / "dir.png", r"not a file: .*dir\.png"),
        (lambda d: os.mkfifo(d / "pipe.mp4") or d / "pipe.mp4", r"not a file: .*pipe\.mp4"),
        (lambda d: (d / "dangling.jpg").symlink_to(d / "gone.jpg") or d / "dangling.jpg", r"not found: .*dangling"),
        (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", r"unsupported file type '\.txt'.*notes"),
        (lambda d: (d / "album").mkdir() or d / "album", r"album is a folder, not an image or video file"),
    ],
    ids=["missing", "directory", "fifo", "dangling-symlink", "unknown-extension", "folder"],
)
def test_probe_refuses_what_is_not_a_readable_media_file(tmp_path, make, expected):
    with pytest.raises(UserError, match=expected):
        probe_media_file(make(tmp_path))


def test_a_video_given_as_an_image_is_refused_with_what_to_do(sample_video_path, sample_image_path, tmp_path):
    with pytest.raises(UserError, match="corrupt or not an image .*: a video is given as a video, not as an image"):
        load_image(str(sample_video_path))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"corrupt or not an image \(.*\)$"):  # (no video hint for a .jpg)
        load_image(str(broken))


def test_probe_refuses_an_image_whose_header_does_not_decode(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.jpg"):
        probe_media_file(path)


def test_probe_and_load_refuse_an_image_of_a_format_the_kit_does_not_take(tmp_path):
    path = tmp_path / "animated.png"
    Image.new("RGB", (8, 8)).save(path, format="GIF")
    for check in (probe_media_file, load_image):
        with pytest.raises(UserError, match=r"animated\.png is a GIF file: supported formats are BMP JPEG MPO PNG"):
            check(path)


def test_probe_refuses_an_oversized_image_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20_000, 10_000)).save(path)
    with pytest.raises(UserError, match=r"bomb\.png.*limit"):
        probe_media_file(path)


def test_probe_refuses_a_video_that_does_not_open_or_decode(sample_video_path, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 4096)
    with pytest.raises(UserError, match=r"garbage\.mp4.*(corrupt|not a video)"):
        probe_media_file(garbage)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(sample_video_path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"truncated\.mp4"):
        probe_media_file(truncated)


# ------------------------------------------------------------------------------------- images deeper than 8 bits
RAMP = np.linspace(0, 1, 256)  # left to right, black to white


def _ramp_image(mode: str, full_scale: float, offset: float = 0.0) -> Image.Image:
    values = np.tile(RAMP * full_scale + offset, (4, 1))
    if mode.startswith("I;16"):
        dtype = {"I;16B": ">u2"}.get(mode, "<u2")
        return Image.frombytes(mode, (256, 4), np.round(values).astype(dtype).tobytes())
    return Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode)


def _assert_is_the_8bit_ramp(image: Image.Image) -> None:
    assert image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    assert (pixels == pixels[..., :1]).all()  # grey
    assert np.abs(pixels[0, :, 0] - np.round(RAMP * 255)).max() <= 1


@pytest.mark.parametrize(
    "mode, full_scale, offset",
    [
        ("I;16", 65535, 0),
        ("I;16B", 65535, 0),
        ("I;16L", 65535, 0),
        ("I", 65535, 0),  # a 16-bit image held as 32-bit integers
        ("I", 2_000_000, -1_000_000),  # beyond 16 bits, negative too: its own range
        ("F", 1.0, 0),
        ("F", 255, 0),
        ("F", 1000.0, -500.0),  # beyond the nominal scales: its own range
    ],
)
def test_deep_image_is_scaled_to_8_bits_not_clipped_to_white(mode, full_scale, offset):
    _assert_is_the_8bit_ramp(load_image(_ramp_image(mode, full_scale, offset)))


def test_16_bit_png_file_is_scaled_to_8_bits(tmp_path):
    path = tmp_path / "deep.png"
    _ramp_image("I;16", 65535).save(path)
    assert Image.open(path).mode.startswith("I")  # the file really is 16-bit
    _assert_is_the_8bit_ramp(load_image(path))


def test_dark_16_bit_image_stays_dark_and_nan_does_not_spread():
    dark = load_image(_ramp_image("I;16", 4096))  # values up to 1/16 of full scale
    assert np.asarray(dark).max() == round(4096 / 65535 * 255)
    values = np.tile(RAMP, (4, 1)).astype(np.float32)
    values[0, 0] = np.nan
    floats = np.asarray(load_image(Image.fromarray(values, "F")))
    assert floats[0, 0, 0] == 0 and floats[1, -1, 0] == 255


# ------------------------------------------------------- one bad image fails only its own request in generate()
@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint()), dtype="float32", device="cpu", max_batch_size=4, max_input_length=256,
               max_output_length=4, block_size=16)


def _generate_beside_a_valid_request(llm, bad_item):
    valid = [{"text": "Hello there"}]
    outputs = llm.generate([valid, [bad_item, {"text": "What is this?"}], valid],
                           SamplingParams(max_tokens=3, ignore_eos=True))
    assert [o.error is None for o in outputs] == [True, False, True]
    assert all(len(o.token_ids) == 3 for o in (outputs[0], outputs[2]))
    return outputs[1].error


def test_image_whose_resized_side_would_be_0_fails_only_its_request(llm, tmp_path):
    path = tmp_path / "strip.png"  # aspect 100, under 200, but 28 rows of a 50176-pixel budget would round to 0
    make_image(path, width=4000, height=40)
    error = _generate_beside_a_valid_request(llm, {"image": str(path)})
    assert ("strip.png is 4000x40 pixels: fitted to max_pixels 50176, its shorter side would shrink below 28 "
            "pixels (raise max_pixels, or crop an elongated image)") in error


def test_an_image_under_a_max_pixels_of_one_token_is_not_called_elongated(parts):
    """600x500 under the smallest --max_pixels the kit takes rounds both sides to 0: the budget, not the image's
    shape, is why (the message said "too elongated")."""
    preprocess = Preprocessor(parts.path, parts.config, parts.tokenizer, min_pixels=0, max_pixels=TOKEN_PIXELS)
    with pytest.raises(UserError) as info:
        preprocess([{"image": make_image(None, width=600, height=500)}])
    assert "elongated image" in str(info.value) and "too elongated" not in str(info.value)
    assert "<PIL image 600x500> is 600x500 pixels: fitted to max_pixels 784, its shorter side" in str(info.value)


def test_image_beyond_aspect_ratio_200_fails_only_its_request(llm):
    error = _generate_beside_a_valid_request(llm, {"image": make_image(None, width=6000, height=29)})
    assert "6000x29 pixels, which the model cannot take: absolute aspect ratio must be smaller than 200" in error


def test_closed_pil_image_fails_only_its_request(llm):
    image = make_image(None, width=64, height=64)
    image.close()
    error = _generate_beside_a_valid_request(llm, {"image": image})
    assert error == "cannot read <PIL image 64x64>: Operation on closed image"


# ------------------------------------------------------------------------- preprocessing settings, one line each
@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    checkpoint = tiny_checkpoint()
    return SimpleNamespace(path=checkpoint, config=AutoConfig.from_pretrained(checkpoint),
                           tokenizer=AutoTokenizer.from_pretrained(checkpoint))


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"video_fps": 0}, r"^--video_fps must be a positive number of frames per second, got 0$"),
        ({"video_fps": -1.0}, r"^--video_fps must be .* got -1\.0$"),
        ({"video_fps": math.nan}, r"^--video_fps must be .* got nan$"),
        ({"video_fps": math.inf}, r"^--video_fps must be .* got inf$"),
        ({"video_max_frames": 0}, r"^--video_max_frames must be an integer of at least 2 .* got 0$"),
        ({"video_max_frames": 1}, r"^--video_max_frames must be an integer of at least 2 .* got 1$"),
        ({"video_max_frames": -4}, r"^--video_max_frames must be .* got -4$"),
        ({"min_pixels": 0, "max_pixels": 0}, r"^--max_pixels must be at least 784 \(one 28x28 token\), got 0$"),
        ({"max_pixels": 1}, r"^--max_pixels must be at least 784 .* got 1$"),
        ({"min_pixels": -1}, r"^--min_pixels must be 0 or more, got -1$"),
        ({"min_pixels": 5000, "max_pixels": 4000}, r"^--min_pixels 5000 is more than --max_pixels 4000$"),
        ({"min_pixels": 60000}, r"^--min_pixels 60000 is more than max_pixels in preprocessor_config\.json 50176$"),
        ({"max_pixels": 2.5e6}, r"^--max_pixels must be a whole number of pixels, got 2500000\.0$"),
        (
            {"min_pixels": 10**12, "max_pixels": 2 * 10**12, "max_input_length": 4096},
            r"^--min_pixels 1000000000000 makes every image at least 1275510205 tokens .* more than "
            r"--max_input_length 4096$",
        ),
    ],
)
def test_preprocessing_setting_is_refused_in_one_line_naming_the_flag(parts, settings, expected):
    with pytest.raises(UserError, match=expected):
        Preprocessor(parts.path, parts.config, parts.tokenizer, **settings)


def test_settings_at_the_limits_are_accepted(parts):
    Preprocessor(parts.path, parts.config, parts.tokenizer, video_fps=1e-3, video_max_frames=2, min_pixels=0,
                 max_pixels=TOKEN_PIXELS, max_input_length=1)
    Preprocessor(parts.path, parts.config, parts.tokenizer, min_pixels=256 * TOKEN_PIXELS,
                 max_pixels=256 * TOKEN_PIXELS, max_input_length=256)


@pytest.mark.parametrize(
    "item, expected",
    [
        ({"image": "IMAGE", "max_pixels": 100},
         r"^request item 2: max_pixels must be at least 784 \(one 28x28 token\), got 100$"),
        ({"image": "IMAGE", "max_pixels": 2.5e6}, r"^request item 2: max_pixels must be a whole number of pixels, "
                                                  r"got 2500000\.0$"),
        ({"image": "IMAGE", "min_pixels": True}, r"^request item 2: min_pixels must be a whole number .* got True$"),
        ({"image": "IMAGE", "min_pixels": -1}, r"^request item 2: min_pixels must be 0 or more, got -1$"),
        ({"image": "IMAGE", "min_pixels": 5000, "max_pixels": 4000},
         r"^request item 2: min_pixels 5000 is more than max_pixels 4000$"),
        ({"image": "IMAGE", "min_pixels": 60000},
         r"^request item 2: min_pixels 60000 is more than max_pixels in preprocessor_config\.json 50176$"),
        ({"image": "IMAGE", "min_pixels": 10**7, "max_pixels": 10**7},
         r"^request item 2: min_pixels 10000000 makes every image at least 12756 tokens .* more than "
         r"--max_input_length 4096$"),
        ({"video": "VIDEO", "max_pixels": 10}, r"^request item 2: max_pixels must be at least 784 .* got 10$"),
        ({"video": "VIDEO", "max_pixels": None}, r"^request item 2: max_pixels must be a whole number .* got None$"),
        ({"video": "VIDEO", "fps": 0}, r"^request item 2: fps must be a positive number of frames per second, got 0$"),
        ({"video": "VIDEO", "min_pixels": 4000},
         r"^request item 2: a video item takes fps and max_pixels besides its video, not 'min_pixels'$"),
        ({"image": "IMAGE", "fps": 2.0},
         r"^request item 2: an image item takes min_pixels and max_pixels besides its image, not 'fps'$"),
        ({"text": "hi", "max_pixels": 784}, r"^request item 2: a text item takes nothing besides its text, not "
                                            r"'max_pixels'$"),
    ],
)
def test_an_items_own_setting_is_refused_as_the_flag_is_naming_the_item_before_any_medium_loads(
    parts, sample_image_path, sample_video_path, monkeypatch, item, expected
):
    import atb_models.multimodal.prompt as prompt

    def no_loading(*args, **kwargs):
        raise AssertionError("a medium was read before the request's items were checked")

    monkeypatch.setattr(prompt, "load_image", no_loading)
    monkeypatch.setattr(prompt, "load_video", no_loading)
    preprocess = Preprocessor(parts.path, parts.config, parts.tokenizer, max_input_length=4096)
    media = {"IMAGE": str(sample_image_path), "VIDEO": str(sample_video_path)}
    item = {key: media.get(value, value) if isinstance(value, str) else value for key, value in item.items()}
    with pytest.raises(UserError, match=expected):
        preprocess([{"image": str(sample_image_path)}, item, {"text": "Compare."}])


def test_an_items_bound_meets_the_flags_under_the_flags_names(parts, sample_image_path):
    preprocess = Preprocessor(parts.path, parts.config, parts.tokenizer, min_pixels=4000, max_pixels=8000)
    with pytest.raises(UserError, match=r"^request item 1: min_pixels 9000 is more than --max_pixels 8000$"):
        preprocess([{"image": str(sample_image_path), "min_pixels": 9000}])
    with pytest.raises(UserError, match=r"^request item 1: --min_pixels 4000 is more than max_pixels 3000$"):
        preprocess([{"image": str(sample_image_path), "max_pixels": 3000}])


def test_image_over_the_token_budget_is_refused_before_it_is_resized(parts, monkeypatch):
    preprocess = Preprocessor(parts.path, parts.config, parts.tokenizer, max_pixels=10**7, max_input_length=100)
    def no_resize(*args, **kwargs):
        raise AssertionError("the image was resized before its token count was checked")

    monkeypatch.setattr(preprocess.image_processor, "preprocess", no_resize)
    with pytest.raises(UserError, match=r"<PIL image 1000x1000> would take 1296 tokens at 1008x1008 pixels, more "
                                        r"than --max_input_length 100"):
        preprocess([{"image": make_image(None, width=1000, height=1000)}])
    within = Preprocessor(parts.path, parts.config, parts.tokenizer, max_input_length=100)
    monkeypatch.setattr(within.image_processor, "preprocess", no_resize)
    with pytest.raises(UserError, match=r"<PIL image 1000x1000> would take 1296 tokens at 1008x1008 pixels, more "
                                        r"than --max_input_length 100: lower its max_pixels or raise"):
        within([{"image": make_image(None, width=1000, height=1000), "max_pixels": 10**7}])


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--video_max_frames", "1"], "Error: --video_max_frames must be an integer of at least 2"),
        (["--video_fps", "nan"], "Error: --video_fps must be a positive number of frames per second, got nan"),
        (["--min_pixels", "100000000", "--max_pixels", "200000000"],
         "Error: --min_pixels 100000000 makes every image at least 127552 tokens (28x28 pixels each), more than "
         "--max_input_length 4096"),
        # (single mode's every request is the one prompt: refused before the model loads, not after)
        (["--limit_mm_per_prompt", "video=1,image=0"],
         "Error: the request holds 1 image, more than --limit_mm_per_prompt image=0 allows"),
    ],
)
def test_run_pa_refuses_a_bad_preprocessing_flag_in_one_line_before_loading_weights(
    parts, sample_image_path, capsys, monkeypatch, flags, expected
):
    from examples.models.qwen2_vl.run_pa import main

    import atb_models.engine.llm as llm_module

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the flag was checked")

    monkeypatch.setattr(llm_module, "ModelRunner", no_weights)
    status = main(["--model_path", str(parts.path), "--input_image", str(sample_image_path), "--device", "cpu",
                   *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1].startswith(expected) and len([line for line in err if line.startswith("Error")]) == 1


@pytest.mark.parametrize(
    "value, expected",
    [
        ("audio=1", "'audio' is not a modality it limits (image, video)"),
        ("image=-1", "image must be a whole number of images, 0 or more, got -1"),
        ('{"video": 1.5}', "video must be a whole number of videos, 0 or more, got 1.5"),
        ("image", "expected image=N,video=M (either may be left out), got 'image'"),
        ("image=1,,video=2", "expected image=N,video=M (either may be left out), got 'image=1,,video=2'"),
        ("image=1,image=2", "image is given twice in 'image=1,image=2'"),
        ('{"image": 1', """expected a JSON object such as {"image": 2}, got '{"image": 1'"""),
    ],
)
def test_a_bad_limit_mm_per_prompt_is_one_error_line_at_start(capsys, value, expected):
    from atb_models.serve.__main__ import main as serve
    from examples.models.qwen2_vl.run_pa import main as run_pa

    for main, prog in ((lambda argv: run_pa(argv), "run_pa"), (serve, "python -m atb_models.serve")):
        with pytest.raises(SystemExit) as exit_:
            main(["--model_path", "/nonexistent", "--limit_mm_per_prompt", value])
        assert exit_.value.code == 1
        assert capsys.readouterr().err == (f"Error: argument --limit_mm_per_prompt: {expected} (`{prog} --help` "
                                           "lists the flags)\n")


def test_limit_mm_per_prompt_takes_vllms_forms():
    from atb_models.cli.run_pa import media_limits

    assert media_limits("image=2,video=0") == media_limits(" image = 2 , video=0") == {"image": 2, "video": 0}
    assert media_limits('{"image": 2, "video": 0}') == {"image": 2, "video": 0}
    assert media_limits("video=3") == {"video": 3}


@pytest.mark.parametrize(
    "limits, expected",
    [({"audio": 1}, r"^--limit_mm_per_prompt: 'audio' is not a modality it limits \(image, video\)$"),
     ({"image": True}, r"^--limit_mm_per_prompt: image must be a whole number of images, 0 or more, got True$"),
     ("image=2", r"^--limit_mm_per_prompt: must map image and video to the most of each a request may hold, got "
                 r"'image=2'$")],
)
def test_a_bad_limit_mm_per_prompt_is_refused_by_the_engine_naming_it(parts, limits, expected):
    with pytest.raises(UserError, match=expected):
        Preprocessor(parts.path, parts.config, parts.tokenizer, limit_mm_per_prompt=limits)


def test_a_request_over_limit_mm_per_prompt_fails_alone_before_its_media_are_read(tiny_checkpoint,
                                                                                   sample_image_path):
    llm = LLM(str(tiny_checkpoint()), dtype="float32", device="cpu", max_batch_size=4, max_input_length=256,
              max_output_length=4, block_size=16, limit_mm_per_prompt={"image": 1, "video": 0})
    image = str(sample_image_path)
    requests = [[{"image": image}, {"text": "One."}],
                [{"image": "missing.jpg"}, {"text": "and"}, {"image": "gone.jpg"}],  # (counted, never opened)
                [{"video": "missing.mp4"}, {"text": "A clip."}],
                [{"text": "Hello there"}]]
    outputs = llm.generate(requests, SamplingParams(max_tokens=3, ignore_eos=True))
    assert [out.error for out in outputs] == [
        None, "the request holds 2 images, more than --limit_mm_per_prompt image=1 allows",
        "the request holds 1 video, more than --limit_mm_per_prompt video=0 allows", None]
    assert len(outputs[0].token_ids) == len(outputs[3].token_ids) == 3


# ----------------------------------------------------------------------------------- no code from a model folder
def test_preprocessor_config_with_auto_map_runs_no_folder_code(parts, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(parts.path, folder)
    marker = tmp_path / "ran"
    (folder / "evil_processor.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import Qwen2VLImageProcessor\n"
        "class EvilProcessor(Qwen2VLImageProcessor):\n    pass\n"
    )
    config_path = folder / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoImageProcessor": "evil_processor.EvilProcessor"}
    config_path.write_text(json.dumps(config))
    monkeypatch.setattr(sys, "stdin", None)  # a prompt for "y" would fail here instead of waiting
    preprocess = Preprocessor(folder, parts.config, parts.tokenizer)
    assert type(preprocess.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert not hasattr(preprocess.image_processor, "trust_remote_code")
    assert not marker.exists()
    assert preprocess([{"text": "hi"}]).token_ids


def test_corrupt_preprocessor_config_is_one_line_naming_it(parts, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(parts.path, folder)
    (folder / "preprocessor_config.json").write_text("{ not json")
    with pytest.raises(UserError, match=r"cannot read .*model/preprocessor_config\.json"):
        Preprocessor(folder, parts.config, parts.tokenizer)


@pytest.mark.parametrize("key, value, model_key", [
    ("patch_size", 16, "patch_size"),                  # patches of the wrong length: the tower's first linear failed
    ("temporal_patch_size", 1, "temporal_patch_size"),
    ("merge_size", 4, "spatial_merge_size"),           # ran, feeding the tower its patches in the wrong order
])
def test_a_preprocessor_config_that_cuts_patches_the_tower_cannot_take_is_one_line(parts, tmp_path, key, value,
                                                                                     model_key):
    folder = tmp_path / "model"
    shutil.copytree(parts.path, folder)
    config_path = folder / "preprocessor_config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), **{key: value})))
    model_value = getattr(parts.config.vision_config, model_key)
    with pytest.raises(UserError, match=rf"^{key} {value} of .*model/preprocessor_config\.json differs from "
                                        rf"vision_config\.{model_key} {model_value} in config\.json"):
        Preprocessor(folder, parts.config, parts.tokenizer)


def test_a_frame_list_cut_to_max_frames_reports_the_rate_of_the_frames_kept(sample_frames):
    """Time-aligned positions follow the returned rate: 4 frames at 2 fps cut to 2 span the same time at 1 fps."""
    from atb_models.multimodal.media import load_video

    frames, fps = load_video([str(path) for path in sample_frames], fps=2.0, max_frames=2)
    assert len(frames) == 2 and fps == 1.0
    frames, fps = load_video([str(path) for path in sample_frames], fps=2.0, max_frames=8)
    assert len(frames) == 4 and fps == 2.0


@pytest.mark.parametrize("change, expected", [
    (dict(window_size=14), "window_size 14 .* at least one merged patch \\(28 pixels\\)"),
    (dict(fullatt_block_indexes=[1, 9]), "fullatt_block_indexes \\[9\\] .* name no block of the 4"),
    (dict(out_hidden_size=96), "out_hidden_size 96 .* must equal hidden_size 64"),
])
def test_a_windowed_vision_config_that_cannot_work_is_refused_at_load(change, expected):
    from atb_models.config import _check_vision_windows
    from atb_models.errors import UserError

    vision = SimpleNamespace(window_size=112, patch_size=14, spatial_merge_size=2, depth=4,
                             fullatt_block_indexes=[1, 3], out_hidden_size=64)
    _check_vision_windows(vision, 64, "config.json")  # a sound one passes
    with pytest.raises(UserError, match=expected):
        _check_vision_windows(SimpleNamespace(**{**vars(vision), **change}), 64, "config.json")
