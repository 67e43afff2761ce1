"""Tiny random Qwen2-VL checkpoints and sample media for the tests (`python -m atb_models.demo`), and the bundled
demo reader (`reader.py`, trained by tools/train_reader.py)."""

from atb_models.demo.checkpoint import (
    TinyShape,
    build_checkpoint,
    build_demo,
    build_tokenizer,
    count_video_frames,
    make_frames,
    make_image,
    make_video,
)

__all__ = [
    "TinyShape",
    "build_checkpoint",
    "build_demo",
    "build_tokenizer",
    "count_video_frames",
    "make_frames",
    "make_image",
    "make_video",
]
