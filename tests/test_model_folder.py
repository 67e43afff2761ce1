"""A model folder is input too: what the kit refuses in one, and how it says so.

Custom code (an `auto_map`) is refused before transformers sees the folder, so nothing prompts and nothing of the
folder runs; shards must be files of the folder; NaN/inf weights, impossible head counts or rotary splits, token ids
beyond the embedding table and a missing or broken tokenizer.json are each one UserError naming the culprit.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from atb_models import LLM, UserError
from atb_models.weights import CheckpointTensor, checkpoint_files
from tests.parity_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(dtype="float32", device="cpu", max_batch_size=1, max_input_length=256, max_output_length=8,
               block_size=16)


@pytest.fixture
def folder(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the default tiny checkpoint that a test may damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(), path)
    return path


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def load_error(path) -> str:
    with pytest.raises(UserError) as info:
        LLM(path if path is None or isinstance(path, int) else str(path), **OPTIONS)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ custom code


def plant_custom_code(folder: Path, marker: Path, json_name: str) -> None:
    """A tokenizer class in the folder whose import leaves `marker`, and an auto_map in `json_name` pointing at it.
    In tokenizer_config.json the tokenizer_class names it too: the case where transformers asks whether to run it."""
    (folder / "planted.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class PlantedTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    auto_map = {"AutoTokenizer": ["planted.PlantedTokenizer", "planted.PlantedTokenizer"],
                "AutoImageProcessor": "planted.PlantedTokenizer"}

    def plant(data):
        data["auto_map"] = auto_map
        if json_name == "tokenizer_config.json":
            data["tokenizer_class"] = "PlantedTokenizer"

    edit_json(folder / json_name, plant)


@pytest.mark.parametrize("json_name", ["tokenizer_config.json", "config.json", "preprocessor_config.json"])
def test_folder_asking_for_custom_code_is_refused_without_a_prompt_and_runs_none_of_it(folder, tmp_path, monkeypatch,
                                                                                         json_name):
    marker = tmp_path / "marker"
    plant_custom_code(folder, marker, json_name)
    # A user who would answer "y" to transformers' prompt: the kit must never ask.
    answer = io.StringIO("y\n")
    monkeypatch.setattr(sys, "stdin", answer)
    message = load_error(folder)
    assert f"{folder / json_name} asks for custom code (auto_map" in message
    assert answer.tell() == 0, "something read the prompt's answer"
    assert not marker.exists(), "the folder's Python ran"


# ------------------------------------------------------------------------------------------------ shard paths


def index_naming(folder: Path, shard: str, names: list) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {name: shard for name in names}}))


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_index_naming_a_shard_outside_the_folder_is_refused(folder, tmp_path, kind):
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    names = list(load_file(folder / "model.safetensors"))
    shutil.move(folder / "model.safetensors", outside)
    shard = {"parent": "../elsewhere/x.safetensors", "absolute": str(outside), "symlink": "linked.safetensors"}[kind]
    if kind == "symlink":
        (folder / "linked.safetensors").symlink_to(outside)
    index_naming(folder, shard, names)
    with pytest.raises(UserError) as info:
        checkpoint_files(str(folder))
    assert f"names shard {shard!r}" in str(info.value) and "outside" in str(info.value)


def test_hub_snapshot_shards_linked_into_its_blobs_folder_still_load(folder, tmp_path):
    # The Hugging Face cache keeps <repo>/snapshots/<revision>/<file> as links to <repo>/blobs/<hash>.
    repo = tmp_path / "models--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    names = list(load_file(folder / "model.safetensors"))
    shutil.move(folder / "model.safetensors", blobs / "f00d")
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")
    index_naming(snapshot, "model.safetensors", names)
    assert set(checkpoint_files(str(snapshot)).values()) == {str(snapshot / "model.safetensors")}


@pytest.mark.parametrize("damage", ["truncated", "lacks a tensor"])
def test_an_indexed_shard_that_is_truncated_or_lacks_a_named_tensor_is_one_user_error(folder, tmp_path, damage):
    """Both were safetensors' own errors, a traceback from run_pa and from the quantize tool, with an index; without
    one the header was already checked."""
    from atb_models.quantize import quantize_checkpoint

    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    if damage == "truncated":
        index_naming(folder, "model.safetensors", names)
        os.truncate(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size - 100)
        expected = "cannot read weights file"
    else:
        save_file({name: tensors[name] for name in names[1:]}, folder / "model.safetensors")
        index_naming(folder, "model.safetensors", names)
        expected = f"names shard model.safetensors for {names[0]}, which that shard does not hold"
    assert expected in load_error(folder)
    with pytest.raises(UserError, match=expected):
        quantize_checkpoint(str(folder), str(tmp_path / "out"), "w8a16", None, False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ weight values


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_weight_is_refused_at_load_naming_the_tensor(folder, bad):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    message = load_error(folder)
    assert "tensor model.layers.1.mlp.down_proj.weight" in message and "NaN or inf" in message


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_weight_stored_as_integers_or_booleans_is_refused_not_converted(folder, dtype):
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    message = load_error(folder)
    assert f"tensor {name}" in message and "where the model takes a floating-point weight" in message


def test_a_weight_that_overflows_the_chosen_dtype_says_so(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.tensor([1.0, 1e6])}, path)
    with safe_open(path, framework="pt") as handle:
        with pytest.raises(UserError, match=r"tensor w in .* beyond the range of torch.float16: choose a wider"):
            CheckpointTensor(handle, "w", torch.float16, str(path)).full()
        assert CheckpointTensor(handle, "w", torch.float32, str(path)).full()[1] == 1e6


# ------------------------------------------------------------------------------------------------ config values


@pytest.mark.parametrize("model_path", [None, 7])
def test_model_path_that_is_not_a_path_is_a_clear_error(model_path):
    assert "model_path must be a folder path" in load_error(model_path)


@pytest.mark.parametrize("key, value, expected", [
    ("num_attention_heads", 0, "num_attention_heads 0 in "),
    ("num_attention_heads", 3, "num_attention_heads 3 in .* does not divide hidden_size 64"),
    ("num_key_value_heads", 0, "num_key_value_heads 0 in "),
    ("num_key_value_heads", 3, "num_key_value_heads 3 in .* does not divide num_attention_heads 4"),
    ("rope_scaling", {"type": "mrope", "mrope_section": [2, 3, 4]}, r"mrope_section \[2, 3, 4\] .* head_dim / 2 = 8"),
    ("rope_scaling", {"type": "mrope", "mrope_section": [4, 4]}, r"mrope_section \[4, 4\] .* does not fit"),
    ("image_token_id", 600, "image_token_id 600 .* outside the vocabulary"),
    ("vision_end_token_id", 576, "vision_end_token_id 576 .* outside the vocabulary"),
    ("eos_token_id", 999, "eos_token_id 999 .* outside the vocabulary"),
    ("rope_theta", "abc", "rope_theta 'abc' in .* must be a positive number"),
    ("rms_norm_eps", -1, "rms_norm_eps -1 in .* must be a positive number"),
    ("vision_config", [1, 2], "vision_config in .* must be an object, not list"),
    # sizes no memory holds: refused before anything is allocated
    ("vocab_size", 10**12, r"need at least .* GiB of weights a rank; cpu has"),
    ("intermediate_size", 10**15, r"intermediate_size 10+, .* need at least"),
])
def test_impossible_config_values_are_one_clear_error(folder, key, value, expected):
    edit_json(folder / "config.json", lambda config: config.__setitem__(key, value))
    if key == "eos_token_id":
        (folder / "generation_config.json").unlink()  # so that config.json's eos is the one read
    assert_matches(expected, load_error(folder))


def test_default_mrope_section_that_does_not_fit_the_head_is_one_clear_error(folder):
    """Without rope_scaling the model splits the head 1/8, 3/16, 3/16: a head of 18 cannot be split so."""
    def edit(config):
        config.update(hidden_size=72, rope_scaling=None)
        config["vision_config"]["hidden_size"] = 72
    edit_json(folder / "config.json", edit)
    assert_matches(r"mrope_section \[2, 3, 3\] .* head_dim / 2 = 9", load_error(folder))


def test_a_vision_head_the_2d_rotary_cannot_turn_is_refused_at_load(folder):
    """32 wide in 16 heads: heads of 2, where the rotary needs a multiple of 4 (before, the first image failed
    deep in the tower with a traceback; the weights' shapes do not depend on the head count)."""
    edit_json(folder / "config.json", lambda config: config["vision_config"].__setitem__("num_heads", 16))
    assert_matches(r"vision_config.embed_dim 32 / num_heads 16 in .* makes a vision head of 2, .* multiple of 4",
                   load_error(folder))


def assert_matches(pattern: str, message: str) -> None:
    assert re.search(pattern, message), message


def add_token_beyond_the_embedding(folder: Path, token_id: int) -> None:
    token = {"id": token_id, "content": "<|beyond|>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
    edit_json(folder / "tokenizer.json", lambda t: t["added_tokens"].append(token))
    edit_json(folder / "tokenizer_config.json",
              lambda t: t["added_tokens_decoder"].__setitem__(str(token_id),
                                                              {k: v for k, v in token.items() if k != "id"}))


def test_tokenizer_ids_beyond_the_embedding_table_are_refused_at_load(folder):
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    add_token_beyond_the_embedding(folder, vocab_size)
    assert_matches(rf"tokenizer.json holds token id {vocab_size}, beyond the embedding table .* \(vocab_size "
                   rf"{vocab_size}\)", load_error(folder))


def test_an_added_token_key_that_is_no_id_is_one_clear_error(folder):
    edit_json(folder / "tokenizer_config.json", lambda t: t["added_tokens_decoder"].__setitem__("²", {}))
    assert_matches(r"tokenizer_config.json holds token id '²': ids are non-negative integers", load_error(folder))


@pytest.mark.parametrize("damage, expected", [
    (lambda path: path.unlink(), "has no tokenizer.json"),
    (lambda path: path.write_text('{"version": "1.0", "model": {'), "tokenizer.json is not valid JSON"),
    (lambda path: path.write_text("{}"), "tokenizer.json has no model.vocab"),
])
def test_missing_or_corrupt_tokenizer_json_is_one_clear_error(folder, damage, expected):
    damage(folder / "tokenizer.json")
    assert expected in load_error(folder)


def test_tokenizer_json_that_tokenizers_cannot_parse_names_the_file_and_its_error(folder):
    # Valid JSON with a vocabulary, but no model type: transformers would report a missing protobuf instead.
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    message = load_error(folder)
    assert f"cannot load the tokenizer from {folder}: {folder / 'tokenizer.json'}: " in message
    assert "protobuf" not in message


def test_vocabulary_mismatch_at_world_size_2_is_one_error_line(folder, sample_image_path):
    # A checkpoint whose embedding table was cut below the special tokens: before, each rank died with its own
    # IndexError traceback in the first forward pass.
    edit_json(folder / "config.json", lambda config: config.__setitem__("vocab_size", 520))
    tensors = load_file(folder / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:520].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
    result = subprocess.run(["bash", str(ROOT / "examples/models/qwen2_vl/run_pa.sh"), "--world_size", "2",
                             "--model_path", str(folder), "--input_image", str(sample_image_path),
                             "--dtype", "float32"], env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert len(errors) == 1 and "outside the vocabulary (vocab_size 520)" in errors[0], result.stderr


def test_a_long_prompt_brings_no_tokenizer_warning_before_the_kits_own_limit(tiny_checkpoint, capfd):
    from atb_models.config import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_checkpoint()))
    ids = tokenizer("word " * 40000)["input_ids"]
    assert len(ids) > 32768 and "Token indices sequence length" not in capfd.readouterr().err


def test_completions_decode_as_the_tokenizer_decodes_them_with_and_without_clean_up(tiny_checkpoint):
    from atb_models.config import completion_decoder, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_checkpoint()))
    words = tokenizer("Describe it , please ! It's a cat 's toy .\n<|im_end|>")["input_ids"]
    special = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|vision_start|>"])
    cases = [[], words, special + words + special, words[:3], list(range(tokenizer.vocab_size - 5,
                                                                          tokenizer.vocab_size))]
    for clean_up in (False, True):
        tokenizer.clean_up_tokenization_spaces = clean_up
        decode = completion_decoder(tokenizer)
        for ids in cases:
            assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(words, skip_special_tokens=True) != tokenizer.decode(words, skip_special_tokens=True,
                                                                                 clean_up_tokenization_spaces=False)
