"""Reading a checkpoint folder's config.json and generation_config.json, with the checks a user needs."""
import json
import os
from dataclasses import dataclass
from pathlib import Path

from atb_models.errors import UserError

SUPPORTED_MODEL_TYPES = ("qwen2_vl",)


@dataclass
class ModelConfig:
    path: str
    hf_config: object          # transformers.Qwen2VLConfig: a data holder, the kit's own model does the compute
    torch_dtype: str           # the checkpoint's torch_dtype as written in config.json ("bfloat16", ...)
    eos_token_ids: tuple       # every id that ends generation (generation_config.json, else config.json)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a JSON object")
    return data


def _as_id_list(value, source: str) -> list:
    """eos_token_id as an int or a list; a one-token inner list counts as that token."""
    if value is None:
        return []
    ids = []
    for item in [value] if isinstance(value, int) else value:
        if isinstance(item, list) and len(item) == 1:
            item = item[0]
        if not isinstance(item, int):
            raise UserError(f"eos_token_id {item!r} in {source}: only single token ids are supported")
        ids.append(item)
    return ids


def load_model_config(model_path: str) -> ModelConfig:
    if not os.path.isdir(model_path):
        raise UserError(f"--model_path {model_path}: no such folder")
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"--model_path {model_path}: the folder has no config.json")
    raw = _read_json(config_file, "model config")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"unsupported model_type {model_type!r} in {config_file}: this kit serves "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    from transformers import Qwen2VLConfig

    try:
        hf_config = Qwen2VLConfig.from_pretrained(model_path)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot interpret {config_file}: {e}") from None
    eos = []
    generation_file = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(generation_file):
        eos = _as_id_list(_read_json(generation_file, "generation config").get("eos_token_id"), generation_file)
    if not eos:
        eos = _as_id_list(raw.get("eos_token_id"), config_file)
    bad = [i for i in eos if not 0 <= i < hf_config.vocab_size]
    if bad:
        raise UserError(f"eos_token_id {bad[0]} in {model_path} lies outside the vocabulary (size {hf_config.vocab_size})")
    return ModelConfig(model_path, hf_config, raw.get("torch_dtype") or "float32", tuple(eos))


def kit_home() -> Path:
    """Where the kit keeps what it builds (benchmark checkpoints, native kernels): $ATB_MODELS_HOME, else
    atb_models under $XDG_CACHE_HOME or ~/.cache."""
    home = os.environ.get("ATB_MODELS_HOME")
    if home is None:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atb_models"
    return Path(home)
