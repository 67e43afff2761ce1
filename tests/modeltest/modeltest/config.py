"""The model and task yaml files: read, checked key by key, with paths from the command line taking precedence.

Relative paths written in a yaml file are read from the harness folder (the one holding the `modeltest` package,
tests/modeltest in a checkout), as MindIE's harness reads them; relative paths given on the command line are read
from the current folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from atb_models import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
HARNESS_DIR = PACKAGE_DIR.parent
CONFIG_DIR = PACKAGE_DIR / "config"

# The yaml's data_type, in MindIE's spelling or torch's, as the kit's --dtype choice.
DATA_TYPES = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
              "fp32": "float32", "float32": "float32"}


@dataclass(frozen=True)
class InferParams:
    max_output_length: int      # tokens generated per question
    video_fps: float            # frames sampled per second of video
    video_max_frames: int
    min_pixels: int | None      # image pixel floor and ceiling; None: the checkpoint's preprocessor_config.json
    max_pixels: int | None


@dataclass(frozen=True)
class ModelConfig:
    model_name: str
    model_path: str
    data_type: str              # a --dtype choice: auto, bfloat16, float16, float32
    block_size: int
    prompt_prefix: str
    prompt_suffix: str
    infer_params: InferParams


@dataclass(frozen=True)
class TaskConfig:
    task_name: str
    local_dataset_path: str
    requested_max_input_length: int   # sizes the KV cache: prompt tokens, visual tokens included
    requested_max_output_length: int
    subject_mapping: dict             # subset key -> display name, in the yaml's order


class _Section:
    """One yaml mapping, read key by key; keys it does not know are an error, so a typo never goes unnoticed."""

    def __init__(self, data, where: str, source: Path):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{source}: {where} must be a mapping of keys to values, not {type(data).__name__}")
        self.data, self.where, self.source = data, where, source
        self.read: set = set()

    def _get(self, key: str, types: tuple, default, what: str):
        self.read.add(key)
        value = self.data.get(key)
        if value is None:  # absent, or written with no value
            return default
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise UserError(f"{self.source}: {self.where}{key} must be {what}, got {value!r}")
        return value

    def text(self, key: str, default: str = "") -> str:
        return self._get(key, (str,), default, "a string")

    def positive_int(self, key: str, default: int | None) -> int | None:
        value = self._get(key, (int,), default, "a positive integer")
        if value is not None and value < 1:
            raise UserError(f"{self.source}: {self.where}{key} must be a positive integer, got {value!r}")
        return value

    def positive_number(self, key: str, default: float) -> float:
        value = self._get(key, (int, float), default, "a positive number")
        if value <= 0:
            raise UserError(f"{self.source}: {self.where}{key} must be a positive number, got {value!r}")
        return float(value)

    def section(self, key: str) -> "_Section":
        self.read.add(key)
        return _Section(self.data.get(key), f"{self.where}{key}.", self.source)

    def mapping(self, key: str) -> dict:
        return self._get(key, (dict,), {}, "a mapping")

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.read)
        if unknown:
            raise UserError(f"{self.source}: unknown key {self.where}{unknown[0]} (known: "
                            f"{', '.join(self.where + k for k in sorted(self.read))})")


def _read_yaml(path: str, what: str) -> _Section:
    source = Path(path)
    if not source.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        with open(source, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: byte {e.start} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid yaml: {' '.join(str(e).split())}") from None
    return _Section(data, "", source)


def _resolve(path: str) -> str:
    """A yaml-written path: absolute as is, relative from the harness folder."""
    return path if not path or os.path.isabs(path) else str(HARNESS_DIR / path)


def load_model_config(path: str, model_path: str | None = None) -> ModelConfig:
    """The model yaml; `model_path` (--model_path) replaces the yaml's."""
    top = _read_yaml(path, "model config")
    model_name = top.text("model_name")
    if not model_name:
        raise UserError(f"{path}: model_name is required")
    data_type = top.text("data_type", "auto")
    if data_type not in DATA_TYPES:
        raise UserError(f"{path}: data_type {data_type!r} is not one of {', '.join(DATA_TYPES)}")
    yaml_model_path = _resolve(top.text("model_path"))
    block_size = top.positive_int("block_size", 128)
    mm = top.section("mm_model")
    prefix, suffix = mm.text("prompt_prefix"), mm.text("prompt_suffix")
    infer = mm.section("infer_params")
    params = InferParams(max_output_length=infer.positive_int("max_output_length", 100),
                         video_fps=infer.positive_number("video_fps", 2.0),
                         video_max_frames=infer.positive_int("video_max_frames", 768),
                         min_pixels=infer.positive_int("min_pixels", None),
                         max_pixels=infer.positive_int("max_pixels", None))
    for section in (infer, mm, top):
        section.finish()
    model_path = model_path or yaml_model_path
    if not model_path:
        raise UserError(f"no model weights given: pass --model_path DIR or set model_path in {path}")
    if not os.path.isdir(model_path):
        raise UserError(f"model path {model_path}: no such folder")
    return ModelConfig(model_name, model_path, DATA_TYPES[data_type], block_size, prefix, suffix, params)


def load_task_config(path: str, dataset_path: str | None = None, subsets: list[str] | None = None) -> TaskConfig:
    """The task yaml; `dataset_path` (--dataset_path) replaces local_dataset_path, `subsets` (--subsets) picks
    some of subject_mapping's subsets."""
    top = _read_yaml(path, "task config")
    task_name = top.text("task_name")
    if not task_name:
        raise UserError(f"{path}: task_name is required")
    yaml_dataset_path = _resolve(top.text("local_dataset_path"))
    max_input = top.positive_int("requested_max_input_length", 4096)
    max_output = top.positive_int("requested_max_output_length", 256)
    mapping = {}
    for key, entry in top.mapping("subject_mapping").items():
        entry_section = _Section(entry, f"subject_mapping.{key}.", Path(path))
        mapping[str(key)] = entry_section.text("name") or str(key)
        entry_section.finish()
    top.finish()
    if not mapping:
        raise UserError(f"{path}: subject_mapping names no subset")
    if subsets:
        unknown = [key for key in subsets if key not in mapping]
        if unknown:
            raise UserError(f"--subsets {unknown[0]}: not in subject_mapping of {path} "
                            f"({', '.join(mapping)})")
        mapping = {key: mapping[key] for key in dict.fromkeys(subsets)}
    dataset = dataset_path or yaml_dataset_path
    if not dataset:
        raise UserError(f"no dataset given: pass --dataset_path PATH or set local_dataset_path in {path}")
    if not os.path.exists(dataset):
        raise UserError(f"dataset path {dataset}: no such file or folder")
    return TaskConfig(task_name, dataset, max_input, max_output, mapping)
