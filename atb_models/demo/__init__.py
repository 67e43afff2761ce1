"""The bundled demo reader (`reader.py`, trained by tools/train_reader.py), and tiny random Qwen2-VL checkpoints and
sample media for the tests (`checkpoint.py`, `python -m atb_models.demo build`).

The checkpoint builder needs transformers' modeling code, OpenCV and the tokenizer trainers: its names below are
imported on first use (PEP 562), so that finding the demo reader (`atb_models.demo.reader`) does not load them.
"""

import importlib

_CHECKPOINT_NAMES = (
    "TinyShape",
    "build_checkpoint",
    "build_demo",
    "build_tokenizer",
    "make_frames",
    "make_image",
    "make_video",
)

__all__ = list(_CHECKPOINT_NAMES)


def __getattr__(name: str):
    if name not in _CHECKPOINT_NAMES:
        raise AttributeError(f"module 'atb_models.demo' has no attribute {name!r}")
    value = getattr(importlib.import_module("atb_models.demo.checkpoint"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CHECKPOINT_NAMES))
