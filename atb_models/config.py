"""Reading a checkpoint folder's config.json, generation_config.json and tokenizer, with the checks a user needs."""
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from atb_models.errors import UserError
from atb_models.models import ModelFamily, model_family

# The json files transformers reads from a model folder (config, tokenizer, image processor, processor).
CODE_POINTER_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                      "preprocessor_config.json", "processor_config.json", "chat_template.json")


@dataclass
class ModelConfig:
    path: str
    family: ModelFamily        # the registry's record of the checkpoint's model_type
    hf_config: object          # the family's transformers config: a data holder, the kit's own model does the compute
    torch_dtype: str           # the checkpoint's torch_dtype as written in config.json ("bfloat16", ...)
    eos_token_ids: tuple       # every id that ends generation (generation_config.json, else config.json)
    quantization: object = None  # quantization.Quantization of a quantized checkpoint, None for a float one


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


def load_model_config(model_path) -> ModelConfig:
    """Read and check a checkpoint folder's configuration: everything a later stage would trip over (custom code,
    head counts, the rotary split, token ids beyond the embedding table, the tokenizer file) is refused here, as
    one UserError, before transformers or any rank's process group is involved."""
    model_path, raw, family = check_model_folder(model_path)
    config_file = os.path.join(model_path, "config.json")
    for key in ("vision_config", "rope_scaling"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise UserError(f"{key} in {config_file} must be an object, not {type(raw[key]).__name__}")
    try:
        hf_config = family.config_class().from_pretrained(model_path, trust_remote_code=False)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot interpret {config_file}: {e}") from None
    _check_shapes(hf_config, config_file)
    eos = []
    generation_file = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(generation_file):
        eos = _as_id_list(_read_json(generation_file, "generation config").get("eos_token_id"), generation_file)
    if not eos:
        eos = _as_id_list(raw.get("eos_token_id"), config_file)
    vocab_size = hf_config.vocab_size
    # The special token ids the prompt builder and the model use must each index the embedding table.
    for key, value in [(key, getattr(hf_config, key, None)) for key in family.special_token_keys] + [
            ("eos_token_id", i) for i in eos]:
        if value is None:
            raise UserError(f"{config_file} has no {key}")
        if not _is_int(value) or not 0 <= value < vocab_size:
            raise UserError(f"{key} {value!r} in {model_path} lies outside the vocabulary (vocab_size {vocab_size})")
    largest, where = _largest_tokenizer_id(model_path)
    if largest >= vocab_size:
        raise UserError(f"{where} holds token id {largest}, beyond the embedding table of {config_file} "
                        f"(vocab_size {vocab_size}): the tokenizer and the weights do not belong together")
    from atb_models.quantization import checkpoint_quantization

    return ModelConfig(model_path, family, hf_config, raw.get("torch_dtype") or "float32", tuple(eos),
                       checkpoint_quantization(model_path, raw))


def check_model_folder(model_path) -> tuple[str, dict, ModelFamily]:
    """The checks of a checkpoint folder that need neither torch nor transformers (a command line runs them before
    those load): a folder with a config.json that parses, of a model_type the kit serves, asking for no custom code.
    Returns the path as a str, config.json's contents and the family."""
    if not isinstance(model_path, (str, os.PathLike)):
        raise UserError(f"model_path must be a folder path (str or os.PathLike), got {type(model_path).__name__}")
    model_path = os.fspath(model_path)
    if not os.path.isdir(model_path):
        raise UserError(f"--model_path {model_path}: no such folder")
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"--model_path {model_path}: the folder has no config.json")
    raw = _read_json(config_file, "model config")
    family = model_family(raw.get("model_type"), config_file)
    refuse_custom_code(model_path)
    return model_path, raw, family


def refuse_custom_code(model_path: str) -> None:
    """An `auto_map` in any json transformers reads from the folder points it at Python code shipped with the
    folder (or on the Hub); transformers would ask whether to run it. The kit runs none: such a folder is refused
    before transformers sees it, so nothing prompts and nothing of the folder is imported."""
    for name in CODE_POINTER_FILES:
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            found = _find_key(_read_json(path, name), "auto_map")
            if found is not None:
                raise UserError(f"{path} asks for custom code ({found}); this kit runs no Python from a model "
                                "folder: use a checkpoint that transformers' own classes read")


def _find_key(data, key: str, where: str = ""):
    """The dotted path of the first `key` anywhere in a json value, or None."""
    if isinstance(data, dict):
        for name, value in data.items():
            path = f"{where}.{name}" if where else name
            if name == key:
                return path
            found = _find_key(value, key, path)
            if found is not None:
                return found
    elif isinstance(data, list):
        for value in data:
            found = _find_key(value, key, where)
            if found is not None:
                return found
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _is_int(value) and value > 0


def _check_shapes(hf_config, config_file: str) -> None:
    """Sizes the model is built from: each a positive integer, heads dividing the width, key/value heads dividing
    the query heads, and the M-RoPE split covering exactly half a head."""
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        value = getattr(hf_config, key, None)
        if not _positive_int(value):
            raise UserError(f"{key} {value!r} in {config_file} must be a positive integer")
    for key in ("rope_theta", "rms_norm_eps"):
        value = getattr(hf_config, key, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise UserError(f"{key} {value!r} in {config_file} must be a positive number")
    hidden, heads, kv_heads = hf_config.hidden_size, hf_config.num_attention_heads, hf_config.num_key_value_heads
    if hidden % heads:
        raise UserError(f"num_attention_heads {heads} in {config_file} does not divide hidden_size {hidden}")
    if heads % kv_heads:
        raise UserError(f"num_key_value_heads {kv_heads} in {config_file} does not divide num_attention_heads "
                        f"{heads}")
    vision = hf_config.vision_config
    for key in ("embed_dim", "num_heads"):
        if not _positive_int(getattr(vision, key, None)):
            raise UserError(f"vision_config.{key} {getattr(vision, key, None)!r} in {config_file} must be a "
                            "positive integer")
    if vision.embed_dim % vision.num_heads:
        raise UserError(f"vision_config.num_heads {vision.num_heads} in {config_file} does not divide "
                        f"vision_config.embed_dim {vision.embed_dim}")
    vision_head = vision.embed_dim // vision.num_heads
    if vision_head % 4:
        # The tower's 2-D rotary turns a quarter of each head by the patch's row and a quarter by its column, each
        # as pairs of dimensions: any other head size fails at the first image, in transformers' tower too.
        raise UserError(f"vision_config.embed_dim {vision.embed_dim} / num_heads {vision.num_heads} in {config_file} "
                        f"makes a vision head of {vision_head}, which the 2-D rotary cannot turn: it must be a "
                        "multiple of 4")
    _check_vision_windows(vision, hidden, config_file)
    head_dim = hidden // heads
    section = mrope_section(hf_config)
    if (not isinstance(section, list) or len(section) != 3 or not all(_is_int(n) and n >= 0 for n in section)
            or 2 * sum(section) != head_dim):
        raise UserError(f"rope_scaling.mrope_section {section!r} in {config_file} does not fit the head size: it "
                        f"must be 3 counts summing to head_dim / 2 = {head_dim / 2:g} (hidden_size {hidden} / "
                        f"num_attention_heads {heads} = head_dim {head_dim})")


def _check_vision_windows(vision, hidden: int, config_file: str) -> None:
    """A windowed vision tower's settings (Qwen2.5-VL; absent from Qwen2-VL's config): a window of at least one
    merged patch, full-attention blocks that exist, and merger outputs as wide as the language model."""
    if not hasattr(vision, "window_size"):
        return
    merged_patch = vision.patch_size * vision.spatial_merge_size
    if not _is_int(vision.window_size) or vision.window_size < merged_patch:
        raise UserError(f"vision_config.window_size {vision.window_size!r} in {config_file} must be at least one "
                        f"merged patch ({merged_patch} pixels)")
    depth = vision.depth
    outside = [i for i in vision.fullatt_block_indexes if not (_is_int(i) and 0 <= i < depth)]
    if outside:
        raise UserError(f"vision_config.fullatt_block_indexes {outside} in {config_file} name no block of the "
                        f"{depth} (0..{depth - 1})")
    if vision.out_hidden_size != hidden:
        raise UserError(f"vision_config.out_hidden_size {vision.out_hidden_size!r} in {config_file} must equal "
                        f"hidden_size {hidden}: the merger's outputs take the place of token embeddings")


def mrope_section(hf_config) -> list:
    """The [t, h, w] frequency bands of M-RoPE: rope_scaling's `mrope_section`, else Qwen2-VL's split of the
    head (1/8, 3/16, 3/16 of head_dim; [16, 24, 24] for a head of 128)."""
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    section = (hf_config.rope_scaling or {}).get("mrope_section")
    return [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16] if section is None else section


def _largest_tokenizer_id(model_path: str) -> tuple:
    """(largest token id, the file naming it) over the tokenizer files: tokenizer.json (its vocabulary and added
    tokens), else vocab.json, and the added tokens of tokenizer_config.json."""
    found = []
    tokenizer_file = os.path.join(model_path, "tokenizer.json")
    vocab_file = os.path.join(model_path, "vocab.json")
    if os.path.isfile(tokenizer_file):
        data = _read_json(tokenizer_file, "tokenizer file")
        model = data.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            ids = list(vocab.values())
        elif isinstance(vocab, list):  # a Unigram model: the id is the position
            ids = [len(vocab) - 1] if vocab else []
        else:
            raise UserError(f"tokenizer file {tokenizer_file} has no model.vocab: it is not a tokenizers file")
        added = data.get("added_tokens") or []
        ids += [token.get("id") for token in added if isinstance(token, dict)]
        found.append((ids, tokenizer_file))
    elif os.path.isfile(vocab_file):
        found.append((list(_read_json(vocab_file, "tokenizer vocabulary").values()), vocab_file))
    else:
        raise UserError(f"--model_path {model_path}: the folder has no tokenizer.json (nor vocab.json)")
    config_file = os.path.join(model_path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        decoder = _read_json(config_file, "tokenizer config").get("added_tokens_decoder") or {}
        # Keys are ids written as text; only ASCII digits make one (str.isdigit admits '²', which int refuses).
        found.append(([int(i) if re.fullmatch(r"[0-9]+", str(i)) else i for i in decoder], config_file))
    largest, where = -1, tokenizer_file
    for ids, path in found:
        for i in ids:
            if not _is_int(i) or i < 0:
                raise UserError(f"{path} holds token id {i!r}: ids are non-negative integers")
            if i > largest:
                largest, where = i, path
    return largest, where


def load_tokenizer(model_path: str):
    """The folder's tokenizer, through transformers with remote code refused; any failure is one UserError."""
    from transformers import AutoTokenizer

    refuse_custom_code(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    except Exception as e:  # tokenizers and transformers' slow-to-fast converters raise their own error types
        reason = str(e).strip()
        tokenizer_file = os.path.join(model_path, "tokenizer.json")
        if os.path.isfile(tokenizer_file):
            # When tokenizer.json fails, transformers tries other files and reports that attempt's failure (a
            # missing protobuf, say); the file's own parse error is the useful one.
            from tokenizers import Tokenizer

            try:
                Tokenizer.from_file(tokenizer_file)
            except Exception as parse_error:
                reason = f"{tokenizer_file}: {parse_error}"
        raise UserError(f"cannot load the tokenizer from {model_path}: {reason}") from None
    # The engine's limits (--max_input_length) decide what is too long; transformers' own warning about
    # tokenizer_config.json's model_max_length would only precede the kit's error with a misleading line.
    tokenizer.model_max_length = sys.maxsize
    return tokenizer


def completion_decoder(tokenizer, skip_special_tokens: bool = True) -> Callable[[list], str]:
    """tokenizer.decode(ids, skip_special_tokens=...) for a list of ints, the same text, without transformers'
    conversion of the list item by item (to_py_obj), which costs many times the fast tokenizer's own decoding. The
    engine decodes each running sequence's whole completion every step, so that conversion was a visible part of a
    batched decode step, growing with the completion (docs/PERFORMANCE.md)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's tokenizers.Tokenizer
    if backend is None:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if tokenizer.clean_up_tokenization_spaces:
        return lambda ids: tokenizer.clean_up_tokenization(backend.decode(ids, skip_special_tokens=skip_special_tokens))
    return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)


def kit_home() -> Path:
    """Where the kit keeps what it builds (benchmark checkpoints, native kernels): $ATB_MODELS_HOME, else
    atb_models under $XDG_CACHE_HOME or ~/.cache."""
    home = os.environ.get("ATB_MODELS_HOME")
    if home is None:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atb_models"
    return Path(home)
