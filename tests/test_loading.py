"""Checkpoint loading and engine set-up: what a user sees when a checkpoint or a limit is wrong, and the dtype
plans the model is built with."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from atb_models import LLM, SamplingParams, UserError
from atb_models.engine import llm as llm_module
from atb_models.layers.sharding import ceil_div

OPTIONS = dict(dtype="float32", device="cpu", max_batch_size=2, max_input_length=256, max_output_length=8,
               block_size=16)


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    """A private copy of the default tiny checkpoint that a test may damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(), path)
    return path


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def load_error(path) -> str:
    with pytest.raises(UserError) as info:
        LLM(str(path), **OPTIONS)
    return str(info.value)


def test_missing_tensor_is_named(checkpoint_copy):
    rewrite_weights(checkpoint_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    assert "lacks tensor model.layers.1.self_attn.k_proj.weight" in load_error(checkpoint_copy)


def test_unexpected_tensor_is_named(checkpoint_copy):
    rewrite_weights(checkpoint_copy, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    assert "unexpected tensor model.layers.0.extra.weight" in load_error(checkpoint_copy)


def test_shape_mismatch_is_named(checkpoint_copy):
    rewrite_weights(checkpoint_copy, lambda t: t.__setitem__("visual.blocks.0.mlp.fc1.bias", torch.zeros(3)))
    message = load_error(checkpoint_copy)
    assert "visual.blocks.0.mlp.fc1.bias" in message and "(3,)" in message


def test_corrupt_weights_file_is_a_clear_error(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "model.safetensors" in load_error(checkpoint_copy)


def test_folder_without_config_json(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    assert "has no config.json" in load_error(checkpoint_copy)


def test_unsupported_model_type(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["model_type"] = "llava"
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    assert "unsupported model_type 'llava'" in load_error(checkpoint_copy)


def test_missing_model_folder(tmp_path):
    assert "no such folder" in load_error(tmp_path / "nowhere")


def test_eos_ids_come_from_generation_config_as_int_or_list(checkpoint_copy):
    generation = json.loads((checkpoint_copy / "generation_config.json").read_text())
    assert isinstance(generation["eos_token_id"], list)
    llm = LLM(str(checkpoint_copy), **OPTIONS)
    assert llm.model_config.eos_token_ids == tuple(generation["eos_token_id"])
    generation["eos_token_id"] = generation["eos_token_id"][0]
    (checkpoint_copy / "generation_config.json").write_text(json.dumps(generation))
    assert LLM(str(checkpoint_copy), **OPTIONS).model_config.eos_token_ids == (generation["eos_token_id"],)


def test_kv_cache_shrinks_to_the_memory_budget_and_requests_still_complete(tiny_checkpoint, monkeypatch):
    # Pretend the host has room for a little over one request's blocks.
    probe = LLM(str(tiny_checkpoint()), **OPTIONS)
    one_request = ceil_div(256 + 8, 16)
    budget = int((one_request + 2) * probe.runner.bytes_per_block / 0.5)
    monkeypatch.setattr(llm_module, "free_memory_bytes", lambda plan: budget)
    llm = LLM(str(tiny_checkpoint()), **{**OPTIONS, "max_batch_size": 4})
    assert llm.block_manager.num_blocks == one_request + 2
    outs = llm.generate([[{"text": f"Hello {i}"}] for i in range(4)], SamplingParams(max_tokens=8, ignore_eos=True))
    assert all(o.error is None and len(o.token_ids) == 8 for o in outs)


def test_too_little_memory_for_one_request_is_a_clear_error(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(llm_module, "free_memory_bytes", lambda plan: 1000)
    with pytest.raises(UserError, match="not enough memory for the KV cache"):
        LLM(str(tiny_checkpoint()), **OPTIONS)


def test_float16_fallback_plan_builds_a_float16_language_model_and_float32_vision(tiny_checkpoint, gpu_policy_on_cpu,
                                                                                  sample_image_path):
    gpu_policy_on_cpu(native_bf16=False)  # a V100's decision, carried out on this machine's CPU
    llm = LLM(str(tiny_checkpoint()), **{**OPTIONS, "dtype": "auto"})
    model = llm.runner.model
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert model.model.layers[0].k_cache.dtype == torch.float16
    assert model.visual.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert model.model.layers[0].upcast_attention
    request = [[{"image": str(sample_image_path)}, {"text": "What is this?"}]]
    half = llm.generate(request, SamplingParams(max_tokens=4, ignore_eos=True))[0]
    full = LLM(str(tiny_checkpoint()), **OPTIONS).generate(request, SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert half.error is None and len(half.token_ids) == 4
    assert half.token_ids[0] == full.token_ids[0]  # the first token survives float16 on this tiny model
