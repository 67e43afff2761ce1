"""Hardening of media loading and preprocessing (issue 12): files named on the command line checked before the
model loads, deep images scaled rather than clipped, an image the model cannot take failing only its own request,
and preprocessing settings refused in one line that names the flag."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from atb_models.demo.checkpoint import make_image, make_video
from atb_models.errors import UserError
from atb_models.multimodal.media import probe_media_file


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
    ],
    ids=["missing", "directory", "fifo", "dangling-symlink", "unknown-extension"],
)
def test_probe_refuses_what_is_not_a_readable_media_file(tmp_path, make, expected):
    with pytest.raises(UserError, match=expected):
        probe_media_file(make(tmp_path))


def test_probe_refuses_an_image_whose_header_does_not_decode(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.jpg"):
        probe_media_file(path)


def test_probe_refuses_an_image_of_a_format_the_kit_does_not_take(tmp_path):
    path = tmp_path / "animated.png"
    Image.new("RGB", (8, 8)).save(path, format="GIF")
    with pytest.raises(UserError, match=r"animated\.png is a GIF file: supported formats are"):
        probe_media_file(path)


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
