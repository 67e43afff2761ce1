"""The Qwen2.5-VL parity oracle: transformers 4.51.3 in a venv of its own, since the kit's pin (4.46) has no
Qwen2.5-VL.

Two halves in one file:
- the kit side (imported by the tests, run by the kit's Python): `ensure_venv()` creates the venv under the kit's
  cache folder (reused when present), `build_checkpoint()` and `reference()` run this file inside it;
- the oracle side (`python tools/qwen25_oracle.py build|reference ...`, run by the venv's Python): it imports
  transformers 4.51.3 and nothing of the kit.

    python tools/qwen25_oracle.py venv      # create the venv (what .ci/run does)

`build` writes a random tiny Qwen2.5-VL checkpoint, taking the tokenizer, chat template and processor files of a
kit-built Qwen2-VL checkpoint (the two families share them). The vision tower's attention gets a larger init scale,
so it is sharp: a wrong window order changes the greedy tokens. `reference` reads prompts the kit preprocessed
(token ids, patches, grids, seconds per temporal grid step) and writes transformers' greedy tokens and float32
logits to JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TRANSFORMERS_VERSION = "4.51.3"
TORCH_VERSION = "2.13.0"
VENV_NAME = f"oracle-qwen25-transformers{TRANSFORMERS_VERSION}"

# The sizes of a tiny Qwen2.5-VL; a build may override any of them.
DEFAULT_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
    "vision_depth": 3,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 48,
    "vision_num_heads": 2,
    "fullatt_block_indexes": [1],
    "window_size": 112,
    "tokens_per_second": 2,
    "rope_form": "default",      # "default": as transformers >= 4.49 saves it; "mrope": as the released configs
    "vision_attention_std": 0.3,
    "merger_std": 0.3,
}


# ------------------------------------------------------------------------------------------------- kit side

def venv_dir() -> Path:
    from atb_models.config import kit_home

    return kit_home() / VENV_NAME


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def venv_ready() -> bool:
    python = venv_python()
    if not python.is_file():
        return False
    probe = subprocess.run([str(python), "-c", "import transformers, torch; print(transformers.__version__)"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == TRANSFORMERS_VERSION


def ensure_venv() -> Path:
    """The oracle venv's Python, creating the venv first when it is missing or incomplete. torch comes from the
    CPU wheel pip finds locally for the pinned version."""
    if not venv_ready():
        target = venv_dir()
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}",
                        f"transformers=={TRANSFORMERS_VERSION}"], check=True)
        if not venv_ready():
            raise RuntimeError(f"{target}: transformers {TRANSFORMERS_VERSION} does not import after installing")
    return venv_python()


def _run_oracle(*args: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([str(venv_python()), __file__, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the Qwen2.5-VL oracle failed ({' '.join(args[:1])}):\n{done.stderr[-4000:]}")


def build_checkpoint(like: Path, out_dir: Path, seed: int = 0, max_pixels: int | None = None, **shape) -> Path:
    """A random tiny Qwen2.5-VL checkpoint in out_dir, built by transformers 4.51.3, with the tokenizer and
    processor files of the Qwen2-VL checkpoint `like`; `shape` overrides DEFAULT_SHAPE."""
    unknown = set(shape) - set(DEFAULT_SHAPE)
    if unknown:
        raise ValueError(f"unknown shape keys {sorted(unknown)}")
    settings = {"shape": {**DEFAULT_SHAPE, **shape}, "seed": seed, "max_pixels": max_pixels}
    _run_oracle("build", "--like", str(like), "--out", str(out_dir), "--settings", json.dumps(settings))
    return Path(out_dir)


def reference(model_dir: Path, prompts: list, max_new_tokens: int, work_dir: Path) -> list:
    """[(greedy tokens, [per-step float32 logits])] from transformers for each prompt, given as dicts of
    input_ids (list), image / video patches and grids, seconds_per_grid (one per video) and, optionally,
    full_attention: True to run every vision block over the whole image (what a wrong window order amounts to)."""
    import torch

    inputs, out = Path(work_dir) / "oracle_inputs.pt", Path(work_dir) / "oracle_reference.json"
    torch.save(prompts, inputs)
    args = ["reference", "--model", str(model_dir), "--inputs", str(inputs), "--out", str(out),
            "--max_new_tokens", str(max_new_tokens)]
    _run_oracle(*args)
    return [(r["tokens"], torch.tensor(r["logits"])) for r in json.loads(out.read_text())]


# ---------------------------------------------------------------------------------------------- oracle side

def _build(like: Path, out_dir: Path, settings: dict) -> None:
    import torch
    from torch import nn
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2RMSNorm

    shape, seed = settings["shape"], settings["seed"]
    base = json.loads((like / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in like.iterdir():
        if item.is_file() and item.name not in ("config.json", "README.md") and "safetensors" not in item.name:
            shutil.copy(item, out_dir / item.name)
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    temporal = head_dim // 8
    section = [temporal, (head_dim // 2 - temporal) // 2, head_dim // 2 - temporal - (head_dim // 2 - temporal) // 2]
    token_keys = ("bos_token_id", "eos_token_id", "pad_token_id", "vision_start_token_id", "vision_end_token_id",
                  "vision_token_id", "image_token_id", "video_token_id")
    config = Qwen2_5_VLConfig(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        vocab_size=base["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        hidden_act="silu",
        max_position_embeddings=base.get("max_position_embeddings", 4096),
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        rope_scaling={"type": "mrope", "mrope_section": section},
        tie_word_embeddings=shape["tie_word_embeddings"],
        torch_dtype="bfloat16",
        vision_config={
            "depth": shape["vision_depth"],
            "hidden_size": shape["vision_hidden_size"],
            "intermediate_size": shape["vision_intermediate_size"],
            "num_heads": shape["vision_num_heads"],
            "hidden_act": "silu",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": shape["window_size"],
            "fullatt_block_indexes": shape["fullatt_block_indexes"],
            "tokens_per_second": shape["tokens_per_second"],
            "out_hidden_size": shape["hidden_size"],
        },
        **{key: base[key] for key in token_keys if key in base},
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Norm scales 1 + N(0, 0.1), everything else N(0, 0.02), but the vision qkv and proj
        # N(0, vision_attention_std) and the merger's linears N(0, merger_std): norms and biases that are not 1 and
        # 0 catch a missing one, sharp and strong vision attention makes window order matter, and image features as
        # large as the token embeddings carry it to the tokens.
        for module_name, module in model.named_modules():
            is_norm = isinstance(module, (nn.LayerNorm, Qwen2RMSNorm))
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator)
                if is_norm and name == "weight":
                    param.copy_(1 + 0.1 * noise)
                elif module_name.endswith(("attn.qkv", "attn.proj")) and name == "weight":
                    param.copy_(shape["vision_attention_std"] * noise)
                elif module_name.startswith("visual.merger.mlp") and name == "weight":
                    param.copy_(shape["merger_std"] * noise)
                else:
                    param.copy_(0.02 * noise)
        tokenizer_size = len(json.loads((like / "tokenizer.json").read_text())["model"]["vocab"]) + len(
            json.loads((like / "tokenizer.json").read_text())["added_tokens"])
        # Rows past the tokenizer only pad the table: a zero logit never wins, so greedy picks decodable ids.
        model.lm_head.weight[tokenizer_size:] = 0
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    saved = json.loads((out_dir / "config.json").read_text())
    if shape["rope_form"] == "mrope":
        saved["rope_scaling"] = {"type": "mrope", "mrope_section": section}
    saved["model_type"] = "qwen2_5_vl"
    (out_dir / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    if settings["max_pixels"] is not None:
        processor = json.loads((out_dir / "preprocessor_config.json").read_text())
        processor["max_pixels"] = settings["max_pixels"]
        (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def _reference(model_dir: Path, inputs: Path, out: Path, max_new_tokens: int) -> None:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                               trust_remote_code=False).eval()
    windowed = model.visual.fullatt_block_indexes
    results = []
    for prompt in torch.load(inputs):
        full = prompt.get("full_attention", False)
        model.visual.fullatt_block_indexes = list(range(len(model.visual.blocks))) if full else windowed
        ids = torch.tensor([prompt["input_ids"]])
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if prompt.get("image_grid_thw") is not None:
            kwargs["pixel_values"] = prompt["pixel_values"].float()
            kwargs["image_grid_thw"] = torch.tensor(prompt["image_grid_thw"])
        if prompt.get("video_grid_thw") is not None:
            kwargs["pixel_values_videos"] = prompt["pixel_values_videos"].float()
            kwargs["video_grid_thw"] = torch.tensor(prompt["video_grid_thw"])
            kwargs["second_per_grid_ts"] = torch.tensor(prompt["seconds_per_grid"], dtype=torch.float32)
        with torch.no_grad():
            generated = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True, eos_token_id=None)
        results.append({"tokens": generated.sequences[0, ids.shape[1]:].tolist(),
                        "logits": [score[0].float().tolist() for score in generated.scores]})
    out.write_text(json.dumps(results))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("venv", help="create the oracle venv under the kit's cache folder (kit side)")
    build = commands.add_parser("build", help="write a tiny random Qwen2.5-VL checkpoint (oracle side)")
    build.add_argument("--like", type=Path, required=True)
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--settings", required=True)
    ref = commands.add_parser("reference", help="greedy tokens and logits for preprocessed prompts (oracle side)")
    ref.add_argument("--model", type=Path, required=True)
    ref.add_argument("--inputs", type=Path, required=True)
    ref.add_argument("--out", type=Path, required=True)
    ref.add_argument("--max_new_tokens", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "venv":
        print(ensure_venv())
    elif args.command == "build":
        _build(args.like, args.out, json.loads(args.settings))
    else:
        _reference(args.model, args.inputs, args.out, args.max_new_tokens)


if __name__ == "__main__":
    main()
