"""The reference's side of atb_models.oracle: run by the venv's Python (transformers 4.51.3), it imports nothing of
the kit, since the venv does not have the kit's other dependencies and the kit's pin is another transformers.

    worker.py build --like DIR --out DIR --settings JSON      a random tiny Qwen2.5-VL checkpoint
    worker.py reference --model DIR --inputs PT --out JSON     greedy tokens and float32 logits of prompts
    worker.py serve --fd N --settings JSON                     a loaded model answering generate() calls
    worker.py jobs --fd N                                      builds and references on request, one at a time

`build` takes the tokenizer, chat template and processor files of a kit-built Qwen2-VL checkpoint (the two families
share them). The vision tower's attention gets a larger init scale, so it is sharp: a wrong window order changes the
greedy tokens. `reference` reads prompts the kit preprocessed (token ids, patches, grids, seconds per temporal grid
step). `serve` keeps one model loaded for the benchmark's and modeltest's timed runs, over a socket inherited from
the kit's process (atb_models.oracle.RemoteReference). `jobs` runs builds and references sent over such a socket
(atb_models.oracle.OracleWorker), so a test session pays the imports of torch and transformers once.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

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


def _build(like: Path, out_dir: Path, settings: dict) -> None:
    import torch
    from torch import nn
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2RMSNorm

    unknown = set(settings["shape"]) - set(DEFAULT_SHAPE)
    if unknown:
        raise ValueError(f"unknown shape keys {sorted(unknown)}")
    shape, seed = {**DEFAULT_SHAPE, **settings["shape"]}, settings["seed"]
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
        full = prompt.pop("full_attention", False)
        model.visual.fullatt_block_indexes = list(range(len(model.visual.blocks))) if full else windowed
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True, eos_token_id=None)
        results.append({"tokens": generated.sequences[0, prompt["input_ids"].shape[1]:].tolist(),
                        "logits": [score[0].float().tolist() for score in generated.scores]})
    out.write_text(json.dumps(results))


def _serve(fd: int, settings: dict) -> None:
    """Loads the model, says it is ready (with what the kit's side needs: pad and eos ids, the parameter sizes the
    decode floor counts), then answers ("generate", inputs, kwargs, timed) messages until ("close",) or EOF."""
    from multiprocessing.connection import Connection

    import torch
    import transformers

    connection = Connection(fd)

    def send(message) -> None:  # torch.save's bytes, as the kit's side reads them (torch.load, weights only)
        buffer = io.BytesIO()
        torch.save(message, buffer)
        connection.send_bytes(buffer.getvalue())

    try:
        torch.set_num_threads(settings["threads"])
        model_class = getattr(transformers, settings["class"])
        model = model_class.from_pretrained(settings["model"], torch_dtype=getattr(torch, settings["dtype"]),
                                            use_safetensors=True, trust_remote_code=False)
        model.visual.to(getattr(torch, settings["vision_dtype"]))
        device = torch.device(settings["device"])
        model = model.to(device).eval()
    except Exception as e:  # noqa: BLE001 - told to the kit's side as one line
        send(("error", f"cannot load {settings['model']}: {type(e).__name__}: {e}"))
        return
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generation = model.generation_config
    send(("ok", {
        "pad_token_id": generation.pad_token_id,
        "eos_token_id": generation.eos_token_id,
        "language_model_sizes": [(name, p.numel()) for name, p in model.model.named_parameters()],
        "lm_head_size": model.lm_head.weight.numel(),
        "description": f"transformers {model_class.__name__}",
    }))

    class Clock:
        """A stopping criterion that never stops: the time each token is ready."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            synchronize()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    while True:
        try:
            message = torch.load(io.BytesIO(connection.recv_bytes()), weights_only=True)
        except EOFError:
            return
        if message[0] == "close":
            return
        _, inputs, kwargs, timed = message
        clock = Clock()
        try:
            inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs.items()}
            with torch.inference_mode():
                sequences = model.generate(**inputs, **kwargs, stopping_criteria=[clock] if timed else None)
            send(("ok", (sequences.cpu(), clock.times)))
        except Exception as e:  # noqa: BLE001 - this request fails; the kit's side decides what that means
            send(("error", f"{type(e).__name__}: {e}"))


def _jobs(fd: int) -> None:
    """Answers ["build", like, out, settings] and ["reference", model, inputs, out, max_new_tokens] (JSON) with
    ["ok", ""] or ["error", the traceback's end], one at a time, until ["close"] or EOF."""
    import traceback
    from multiprocessing.connection import Connection

    connection = Connection(fd)
    while True:
        try:
            command, *arguments = json.loads(connection.recv_bytes())
        except EOFError:
            return
        if command == "close":
            return
        try:
            if command == "build":
                like, out, settings = arguments
                _build(Path(like), Path(out), settings)
            elif command == "reference":
                model, inputs, out, max_new_tokens = arguments
                _reference(Path(model), Path(inputs), Path(out), max_new_tokens)
            else:
                raise ValueError(f"unknown command {command!r}")
            reply = ["ok", ""]
        except Exception:  # noqa: BLE001 - the kit's side raises it, with this traceback
            reply = ["error", traceback.format_exc()[-4000:]]
        connection.send_bytes(json.dumps(reply).encode())


# atb_models.host.VECTOR_MATH_OPERATORS (this process cannot import the kit; a test holds the two lists equal).
VECTOR_MATH_OPERATORS = ("cos", "sin", "tan", "exp", "log", "log2", "log10", "sqrt", "tanh", "erf", "erfc", "erfinv",
                         "atan", "asin", "acos", "trunc")


def _settle_vector_math() -> None:
    """atb_models.host.settle_vector_math for this process: each operator's first MKL call on one thread, so a
    parallel first call cannot pick a wrong kernel for transformers' rotary."""
    import torch

    for dtype in (torch.float32, torch.float64):
        for name in VECTOR_MATH_OPERATORS:
            getattr(torch, name)(torch.full((8,), 0.5, dtype=dtype))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write a tiny random Qwen2.5-VL checkpoint")
    build.add_argument("--like", type=Path, required=True)
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--settings", required=True)
    ref = commands.add_parser("reference", help="greedy tokens and logits for preprocessed prompts")
    ref.add_argument("--model", type=Path, required=True)
    ref.add_argument("--inputs", type=Path, required=True)
    ref.add_argument("--out", type=Path, required=True)
    ref.add_argument("--max_new_tokens", type=int, required=True)
    serve = commands.add_parser("serve", help="keep a model loaded for generate() calls over an inherited socket")
    serve.add_argument("--fd", type=int, required=True)
    serve.add_argument("--settings", required=True)
    jobs = commands.add_parser("jobs", help="run builds and references sent over an inherited socket")
    jobs.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    _settle_vector_math()
    if args.command == "build":
        _build(args.like, args.out, json.loads(args.settings))
    elif args.command == "reference":
        _reference(args.model, args.inputs, args.out, args.max_new_tokens)
    elif args.command == "jobs":
        _jobs(args.fd)
    else:
        _serve(args.fd, json.loads(args.settings))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C reaches the kit's process too, which says so once and closes this one
        raise SystemExit(130) from None
