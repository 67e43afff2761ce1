"""Tiny random Qwen2-VL checkpoints and sample media for the tests and the demo (`python -m atb_models.demo`)."""

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
