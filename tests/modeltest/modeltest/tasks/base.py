"""What every task gives the harness: its subsets of samples, ready to run, and a scorer."""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from pathlib import Path

from atb_models import UserError


@dataclass
class Sample:
    question_id: object         # as the dataset writes it (an int or a string)
    request: list               # the model input: media items, then the text item
    gold: object                # what the scorer compares with
    choices: dict = field(default_factory=dict)   # option letter -> text, for multiple-choice tasks
    error: str | None = None    # why the sample cannot run, found while reading the dataset

    @property
    def prompt(self) -> str:
        return "".join(item["text"] for item in self.request if "text" in item)


@dataclass
class Subset:
    key: str                    # subject_mapping's key
    name: str                   # its display name
    samples: list


@dataclass
class Score:
    values: dict                # metric -> this sample's score in [0, 1]
    prediction: object          # what the scorer read from the output


class Task(abc.ABC):
    """A dataset read whole (so a malformed file fails before the model loads), split into subsets."""

    name: str
    metrics: dict               # score name -> what it means, the first one the headline

    def __init__(self, subsets: list[Subset]):
        self.subsets = subsets

    @abc.abstractmethod
    def score(self, sample: Sample, output: str) -> Score:
        """How one output scores against the sample's gold answers (every task says how)."""

    def zero_score(self) -> Score:
        """What a failed sample counts as."""
        return Score({metric: 0.0 for metric in self.metrics}, None)


def read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{what} {path} is not valid JSON: {e}") from None


def media_path(value: str, base: Path) -> str:
    """A media path from a dataset file: absolute as is, relative from `base`."""
    path = Path(value)
    return str(path if path.is_absolute() else base / path)
