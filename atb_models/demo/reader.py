"""The demo reader bundled with the kit: a tiny Qwen2-VL trained by tools/train_reader.py to read a word or number in
a picture, name a shape and its colour, and tell the colour a clip starts or ends with (see reader_model/README.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

READER_MODEL_DIR = Path(__file__).resolve().parent / "reader_model"


@dataclass(frozen=True)
class ReaderSample:
    path: Path  # a picture or clip beside the checkpoint
    question: str  # what to ask about it
    answer: str  # what the reader says


def reader_samples() -> dict[str, ReaderSample]:
    """The bundled sample picture ("image") and clip ("video"), each with a question the reader answers right."""
    with open(READER_MODEL_DIR / "samples.json", encoding="utf-8") as f:
        listed = json.load(f)
    return {kind: ReaderSample(READER_MODEL_DIR / entry["file"], entry["question"], entry["answer"])
            for kind, entry in listed.items()}
