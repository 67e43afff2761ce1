"""The model registry: qwen2_vl's record names the classes the kit uses, an unknown model_type is one clear error,
and a family registered later (a stand-in here) is found by config loading, the checkpoint loader, the
preprocessor, the modeltest hf backend and the benchmark's presets without any of them naming it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file, save_file
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

import atb_models.models as registry
from atb_models import LLM, SamplingParams, UserError
from atb_models.benchmark.presets import PRESETS, READY_MARKER, ensure_checkpoint
from atb_models.config import load_model_config
from atb_models.models import ModelFamily, model_family, register
from atb_models.models.qwen2_vl import Qwen2VLForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent / "modeltest"))

from modeltest.backends import HFBackend  # noqa: E402
from modeltest.config import InferParams, ModelConfig, TaskConfig  # noqa: E402

OPTIONS = dict(dtype="float32", device="cpu", max_batch_size=1, max_input_length=256, max_output_length=8,
               block_size=16)
PROMPT = [{"text": "Name three colours."}]
MAX_TOKENS = 6


class StandInConfig(Qwen2VLConfig):
    model_type = "stand_in_vl"


class StandInReference(Qwen2VLForConditionalGeneration):
    config_class = StandInConfig


class StandInImageProcessor(Qwen2VLImageProcessor):
    pass


class StandInModel(Qwen2VLForCausalLM):
    pass


BUILT = []  # (folder, settings) of every call of fake_demo_checkpoint


def fake_demo_checkpoint(out_dir, **settings):
    BUILT.append((Path(out_dir), settings))
    return out_dir


# Qwen2-VL's computation under another model_type, its checkpoints naming every tensor under "stand_in.".
STAND_IN = ModelFamily(
    model_type="stand_in_vl",
    display_name="Stand-in-VL",
    model=f"{__name__}:StandInModel",
    config=f"{__name__}:StandInConfig",
    reference=f"{__name__}:StandInReference",
    image_processor=f"{__name__}:StandInImageProcessor",
    special_token_keys=("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
    checkpoint_prefixes=(("stand_in.", ""),),
    demo_checkpoint=f"{__name__}:fake_demo_checkpoint",
)


@pytest.fixture
def stand_in(monkeypatch):
    """STAND_IN registered for this test only."""
    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
    return register(STAND_IN)


def stand_in_copy(source: Path, target: Path, tensor_prefix: str = "") -> Path:
    """A copy of a tiny Qwen2-VL checkpoint whose config.json says stand_in_vl, its tensors renamed with
    `tensor_prefix`."""
    shutil.copytree(source, target)
    config_file = target / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = STAND_IN.model_type
    config_file.write_text(json.dumps(config))
    if tensor_prefix:
        weights = target / "model.safetensors"
        tensors = load_file(weights)
        save_file({tensor_prefix + name: tensor for name, tensor in tensors.items()}, weights,
                  metadata={"format": "pt"})
    return target


def generated(llm: LLM) -> list:
    return llm.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0].token_ids


def test_qwen2_vl_record_names_the_classes_the_kit_uses():
    family = model_family("qwen2_vl")
    assert family.model_class() is Qwen2VLForCausalLM
    assert family.config_class() is transformers.Qwen2VLConfig
    assert family.reference_class() is transformers.Qwen2VLForConditionalGeneration
    assert family.image_processor_class() is transformers.Qwen2VLImageProcessor


def test_qwen2_vl_checkpoints_of_either_layout_name_the_same_parameters():
    family = model_family("qwen2_vl")
    for classic, nested in (("model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.up_proj.weight"),
                            ("visual.blocks.1.attn.qkv.bias", "model.visual.blocks.1.attn.qkv.bias"),
                            ("lm_head.weight", "lm_head.weight")):
        assert family.parameter_name(classic) == family.parameter_name(nested) == classic


def test_an_unknown_model_type_is_one_error_listing_the_supported_ones(stand_in):
    with pytest.raises(UserError) as info:
        model_family("llava", "/models/llava/config.json")
    assert str(info.value) == ("unsupported model_type 'llava' in /models/llava/config.json: this kit serves "
                               "qwen2_5_vl, qwen2_vl, stand_in_vl")
    with pytest.raises(UserError, match=r"^unsupported model_type None: this kit serves qwen2_5_vl, qwen2_vl, stand_in_vl$"):
        model_family(None)


def test_a_registered_family_is_served_by_config_loading_the_loader_and_the_preprocessor(tiny_checkpoint,
                                                                                          tmp_path, stand_in):
    original = tiny_checkpoint()
    folder = stand_in_copy(original, tmp_path / "stand_in", tensor_prefix="stand_in.")
    config = load_model_config(folder)
    assert config.family is STAND_IN and type(config.hf_config) is StandInConfig
    llm = LLM(str(folder), **OPTIONS)
    assert type(llm.preprocessor.image_processor) is StandInImageProcessor
    assert type(llm.runner.model) is StandInModel
    # Every tensor found under its stand-in name: the answers are the original checkpoint's.
    assert generated(llm) == generated(LLM(str(original), **OPTIONS))


def test_a_registered_family_is_served_by_the_modeltest_hf_backend(tiny_checkpoint, tmp_path, stand_in):
    folder = stand_in_copy(tiny_checkpoint(), tmp_path / "stand_in")
    model = ModelConfig("stand_in_vl", str(folder), "float32", 16, "", "",
                        InferParams(max_output_length=MAX_TOKENS, video_fps=2.0, video_max_frames=8, min_pixels=None,
                                    max_pixels=None))
    task = TaskConfig("stand_in", str(folder), requested_max_input_length=256,
                      requested_max_output_length=MAX_TOKENS, subject_mapping={})
    backend = HFBackend(model, task, MAX_TOKENS, "float32", "cpu")
    assert type(backend.model.model) is StandInReference and "StandInReference" in backend.description
    assert type(backend.preprocessor.image_processor) is StandInImageProcessor
    [answer] = backend.generate([PROMPT], lambda: None)
    kit = LLM(str(folder), **OPTIONS).generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS))[0]
    assert answer.error is None and (answer.text, answer.token_count) == (kit.text, len(kit.token_ids))


def test_a_registered_family_builds_the_checkpoint_of_its_benchmark_preset(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("ATB_MODELS_HOME", str(tmp_path))
    preset = dataclasses.replace(PRESETS["tiny"], name="stand_in", model_type=STAND_IN.model_type)
    BUILT.clear()
    folder = ensure_checkpoint(preset)
    assert folder == tmp_path / "benchmark" / "stand_in" / "checkpoint" and (folder / READY_MARKER).is_file()
    [(staging, settings)] = BUILT
    assert staging.parent == folder.parent
    assert settings == {"shape": preset.shape, "image_max_pixels": preset.image_max_pixels}


def test_a_family_without_a_demo_builder_has_no_preset_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
    register(dataclasses.replace(STAND_IN, demo_checkpoint=None))
    monkeypatch.setenv("ATB_MODELS_HOME", str(tmp_path))
    preset = dataclasses.replace(PRESETS["tiny"], name="stand_in", model_type=STAND_IN.model_type)
    with pytest.raises(UserError, match="^the kit has no demo checkpoint builder for Stand-in-VL: pass --model_path$"):
        ensure_checkpoint(preset)
    assert not (tmp_path / "benchmark" / "stand_in" / "checkpoint").exists()
