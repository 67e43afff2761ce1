"""python -m atb_models.quantize --model_path IN --output_dir OUT --method w8a16 [--group_size N] [--quantize_lm_head]

Writes a weight-only int8 checkpoint: the language model's linear weights (q/k/v, o, gate/up, down; the LM head with
--quantize_lm_head) as symmetric int8 with float32 scales per output channel (or per group of N input columns),
everything else as in IN. One output shard per input shard, config.json with "quantize": "w8a16", and
quant_model_description.json naming each tensor's format (MindIE's convention). `LLM(OUT)` and
`run_pa.sh --model_path OUT` load it as it is; `--quantize w8a16` on IN gives the same int8 weights at load.

The output appears whole or not at all: it is written to a staging folder beside OUT and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from atb_models.cli.choices import QUANTIZE_CHOICES
from atb_models.cli.entry import configure_logging, run_entry_point
from atb_models.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m atb_models.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, metavar="IN", help="a float checkpoint folder")
    parser.add_argument("--output_dir", required=True, metavar="OUT", help="a new (or empty) folder")
    parser.add_argument("--method", choices=QUANTIZE_CHOICES, default="w8a16")
    parser.add_argument("--group_size", type=int, metavar="N",
                        help="one scale per N input columns (e.g. 128) instead of one per output channel")
    parser.add_argument("--quantize_lm_head", action="store_true", help="quantize the LM head too")
    return parser


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        raise UserError(f"--output_dir {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise UserError(f"--output_dir {output_dir} exists and is not empty: the tool writes only into a new or "
                        "empty folder")


def _is_quantized(canonical: str, quantize_lm_head: bool) -> bool:
    from atb_models.quantization import CHECKPOINT_LINEARS

    if canonical == "lm_head.weight":
        return quantize_lm_head
    return canonical.startswith("model.layers.") and canonical.endswith(CHECKPOINT_LINEARS)


def quantize_checkpoint(model_path: str, output_dir: str, method: str, group_size: int | None,
                        quantize_lm_head: bool) -> dict:
    """Writes OUT; returns the description written: the settings, then each tensor name -> "W8A16" or "FLOAT"."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    from atb_models.config import load_model_config
    from atb_models.kernels.w8a16 import quantize
    from atb_models.quantization import DESCRIPTION_FILE
    from atb_models.weights import checkpoint_files

    model_config = load_model_config(model_path)
    if model_config.quantization is not None:
        raise UserError(f"{model_path} is already quantized ({model_config.quantization.method}): give the float "
                        "checkpoint")
    if group_size is not None and group_size < 1:
        raise UserError(f"--group_size must be a positive integer, got {group_size}")
    if quantize_lm_head and model_config.hf_config.tie_word_embeddings:
        raise UserError("--quantize_lm_head: this checkpoint's LM head is tied to the embedding table, which stays "
                        "float; quantize without it")
    out = Path(output_dir)
    _check_output_dir(out)
    family = model_config.family
    files = checkpoint_files(model_path)
    by_file: dict[str, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    description = {"model_quant_type": method.upper(), "group_size": group_size or 0}
    weight_map = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-staging-", dir=out.parent))
    try:
        with tqdm(total=len(files), desc="quantizing", unit="tensor", file=sys.stderr) as bar:
            for path, names in by_file.items():
                tensors = {}
                with safe_open(path, framework="pt") as handle:
                    for name in names:
                        tensor = handle.get_tensor(name)
                        if _is_quantized(family.parameter_name(name), quantize_lm_head):
                            if group_size is not None and tensor.shape[1] % group_size:
                                raise UserError(f"--group_size {group_size} does not divide the {tensor.shape[1]} "
                                                f"input columns of {name}")
                            tensors[name], tensors[name + "_scale"] = quantize(tensor, group_size)
                            description[name] = description[name + "_scale"] = "W8A16"
                        else:
                            tensors[name] = tensor.contiguous()
                            description[name] = "FLOAT"
                        bar.update(1)
                shard = os.path.basename(path)
                save_file(tensors, str(staging / shard), metadata={"format": "pt"})
                weight_map.update((name, shard) for name in tensors)
        _write_beside_weights(Path(model_path), staging, method, description, weight_map, DESCRIPTION_FILE)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return description


def _write_beside_weights(model_path: Path, staging: Path, method: str, description: dict, weight_map: dict,
                          description_file: str) -> None:
    """config.json marked quantized, the description, the index if IN had one, and IN's other top-level files."""
    index_name = "model.safetensors.index.json"
    for item in model_path.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in (index_name, "config.json"):
            shutil.copy(item, staging / item.name)
    config = json.loads((model_path / "config.json").read_text())
    config["quantize"] = method
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging / description_file).write_text(json.dumps(description, indent=2) + "\n")
    if (model_path / index_name).is_file():
        total = sum((staging / shard).stat().st_size for shard in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / index_name).write_text(json.dumps(index, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()

    def run() -> int:
        description = quantize_checkpoint(args.model_path, args.output_dir, args.method, args.group_size,
                                          args.quantize_lm_head)
        tensors = {name: kind for name, kind in description.items() if name.endswith((".weight", ".bias"))}
        int8 = sum(1 for kind in tensors.values() if kind == "W8A16")
        floats = len(tensors) - int8
        print(f"wrote {args.output_dir}: {int8} weights in int8 ({args.method}), {floats} tensors as they were",
              flush=True)
        return 0

    return run_entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
