"""python -m atb_models.quantize --model_path IN --output_dir OUT --method w8a16 [--group_size N] [--quantize_lm_head]
                                [--algorithm rtn|gptq [--calib_data FOLDER] [--calib_prompt TEXT] [--calib_tokens N]]

Writes a weight-only int8 checkpoint: the language model's linear weights (q/k/v, o, gate/up, down; the LM head with
--quantize_lm_head) as symmetric int8 with float32 scales per output channel (or per group of N input columns),
everything else as in IN. `--algorithm rtn` (the default) rounds each weight to the nearest step, with no data;
`--algorithm gptq` first runs the float model over calibration prompts (a built-in set of drawn pictures and
questions, or the images and videos of --calib_data) and rounds so that the error reaching each linear's output is
smallest (atb_models.calibration): closer to float, at the cost of minutes. One output shard per input shard,
config.json with "quantize": "w8a16", and quant_model_description.json naming each tensor's format (MindIE's
convention). `LLM(OUT)` and `run_pa.sh --model_path OUT` load it as it is; `--quantize w8a16` on IN gives rtn's
int8 weights at load.

The output appears whole or not at all: it is written to a staging folder beside OUT and renamed when complete.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from atb_models.cli.choices import DEVICE_CHOICES, QUANT_ALGORITHM_CHOICES, QUANTIZE_CHOICES
from atb_models.cli.entry import FlagParser, configure_logging, run_entry_point
from atb_models.errors import UserError
from atb_models.outputs import umask


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="python -m atb_models.quantize", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, metavar="IN", help="a float checkpoint folder")
    parser.add_argument("--output_dir", required=True, metavar="OUT", help="a new (or empty) folder")
    parser.add_argument("--method", choices=QUANTIZE_CHOICES, default="w8a16")
    parser.add_argument("--group_size", type=int, metavar="N",
                        help="one scale per N input columns (e.g. 128) instead of one per output channel")
    parser.add_argument("--quantize_lm_head", action="store_true", help="quantize the LM head too")
    parser.add_argument("--algorithm", choices=QUANT_ALGORITHM_CHOICES, default="rtn",
                        help="rtn: round to nearest, no data (as quantize-at-load); gptq: calibrated on prompts")
    calibration = parser.add_argument_group("calibration (--algorithm gptq)")
    calibration.add_argument("--calib_data", metavar="FOLDER",
                             help="images and videos to calibrate on (default: a built-in set of drawn pictures and "
                                  "text prompts)")
    calibration.add_argument("--calib_prompt", metavar="TEXT",
                             help="the question asked of each --calib_data file (default: Describe this image.)")
    calibration.add_argument("--calib_tokens", type=int, default=None, metavar="N",
                             help="the greedy answer generated for each prompt and calibrated on too (default 64)")
    calibration.add_argument("--device", choices=DEVICE_CHOICES,
                             help="where the float model runs for calibration (default auto)")
    return parser


def _check_output_dir(output_dir: Path) -> list[Path]:
    """A new or empty folder, whose parent can be made and written (checked before any work). Returns the folders
    above it that were made for it, deepest first, for a failed run to remove."""
    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        raise UserError(f"--output_dir {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise UserError(f"--output_dir {output_dir} exists and is not empty: the tool writes only into a new or "
                        "empty folder")
    made = []
    folder = output_dir.parent.absolute()
    while not folder.exists() and not folder.is_symlink():
        made.append(folder)
        folder = folder.parent
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {output_dir}: cannot create {output_dir.parent}: {e.strerror}") from None
    if not os.access(output_dir.parent, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {output_dir}: cannot write in {output_dir.parent}")
    return made


def _open_up(staging: Path, mode: int | None) -> None:
    """The staging folder (mkdtemp's 0700) and its files given the modes a folder made now would have, or the
    replaced empty folder's own `mode`."""
    mask = umask()
    for item in staging.rglob("*"):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
    staging.chmod(mode if mode is not None else 0o777 & ~mask)


def _is_quantized(canonical: str, quantize_lm_head: bool) -> bool:
    from atb_models.quantization import CHECKPOINT_LINEARS

    if canonical == "lm_head.weight":
        return quantize_lm_head
    return canonical.startswith("model.layers.") and canonical.endswith(CHECKPOINT_LINEARS)


@dataclass(frozen=True)
class CalibrationSettings:
    """--algorithm gptq's calibration: the prompts (None: the built-in set), and where the float model runs."""
    data: str | None = None
    prompt: str = "Describe this image."
    tokens: int | None = None
    device: str = "auto"


def quantize_checkpoint(model_path: str, output_dir: str, method: str, group_size: int | None,
                        quantize_lm_head: bool, algorithm: str = "rtn",
                        calibration: CalibrationSettings | None = None) -> dict:
    """Writes OUT; returns the description written: the settings, then each tensor name -> "W8A16" or "FLOAT".
    With algorithm "gptq", `calibration` says what to calibrate on (default: the built-in set)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    from atb_models.config import load_model_config
    from atb_models.host import process_temp_folder
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
    if algorithm != "gptq" and calibration is not None:
        raise UserError("--calib_data, --calib_prompt, --calib_tokens and --device calibrate --algorithm gptq; "
                        "rtn uses no data")
    out = Path(os.path.abspath(output_dir))  # ("." names a folder whose parent is not Path(".").parent)
    made = _check_output_dir(out)
    try:
        family = model_config.family
        files = checkpoint_files(model_path)
        by_file: dict[str, list[str]] = {}
        for name, path in files.items():
            by_file.setdefault(path, []).append(name)
        quantized = [name for name in files if _is_quantized(family.parameter_name(name), quantize_lm_head)]
        # Shapes from the shard headers, where something needs them before the tensors are read.
        columns = _input_columns(files, quantized) if group_size is not None or algorithm == "gptq" else {}
        if group_size is not None:
            for name in quantized:
                if columns[name] % group_size:
                    raise UserError(f"--group_size {group_size} does not divide the {columns[name]} input columns of "
                                    f"{name}")
        calibrated = {}
        if algorithm == "gptq":
            calibrated = _gptq(model_path, files, family, columns, group_size, calibration or CalibrationSettings())
        description = {"model_quant_type": method.upper(), "group_size": group_size or 0, "algorithm": algorithm}
        weight_map = {}
        try:
            # (named by this process: a killed run's is removed by the next run into the same folder)
            staging = Path(process_temp_folder(f".{out.name}-staging-", str(out.parent)))
        except OSError as e:
            raise UserError(f"--output_dir {output_dir}: cannot make a folder in {out.parent}: {e.strerror}") from None
        try:
            with tqdm(total=len(files), desc="quantizing", unit="tensor", file=sys.stderr) as bar:
                for path, names in by_file.items():
                    tensors = {}
                    with safe_open(path, framework="pt") as handle:
                        for name in names:
                            tensor = handle.get_tensor(name)
                            if name in calibrated:
                                tensors[name], tensors[name + "_scale"] = calibrated.pop(name)
                                description[name] = description[name + "_scale"] = "W8A16"
                            elif _is_quantized(family.parameter_name(name), quantize_lm_head):
                                tensors[name], tensors[name + "_scale"] = quantize(tensor, group_size)
                                description[name] = description[name + "_scale"] = "W8A16"
                            else:
                                tensors[name] = tensor.contiguous()
                                description[name] = "FLOAT"
                            bar.update(1)
                    # Where the index put it: shards in sub-folders may share a file name.
                    shard = os.path.relpath(path, model_path)
                    (staging / shard).parent.mkdir(parents=True, exist_ok=True)
                    save_file(tensors, str(staging / shard), metadata={"format": "pt"})
                    weight_map.update((name, shard) for name in tensors)
            _write_beside_weights(Path(model_path), staging, method, description, weight_map, DESCRIPTION_FILE)
            _open_up(staging, stat.S_IMODE(out.stat().st_mode) if out.is_dir() else None)
            if out.is_dir():
                out.rmdir()  # empty, checked above
            os.rename(staging, out)
        except (OSError, SafetensorError) as e:  # a full disk, an I/O error: safetensors says so in its own error type
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise UserError(f"--output_dir {output_dir} not written: {reason} (nothing of it was left)") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:  # (Ctrl-C too) the folders made for OUT go with the failed run; nothing else does
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # (only while empty)
        raise
    return description


def _input_columns(files: dict, names: list[str]) -> dict:
    """Each named tensor's second dimension, read from the shard headers (each shard opened once)."""
    from safetensors import safe_open

    columns = {}
    for path in {files[name] for name in names}:
        with safe_open(path, framework="pt") as handle:
            columns.update((name, handle.get_slice(name).get_shape()[1]) for name in names if files[name] == path)
    return columns


def _gptq(model_path: str, files: dict, family, columns: dict, group_size: int | None,
          settings: CalibrationSettings) -> dict:
    """Each quantized tensor's (int8, scale) by GPTQ (`columns`: the quantized tensors' names and input columns),
    the layers taken in passes whose Hessians fit the budget."""
    from safetensors import safe_open
    from tqdm import tqdm

    from atb_models.calibration import CALIBRATION_TOKENS, Calibration, gptq_quantize, module_of, passes

    names = list(columns)
    module = {name: module_of(family.parameter_name(name)) for name in names}
    in_features = {module[name]: columns[name] for name in names}
    order = sorted(in_features, key=_model_order)
    results = {}
    tokens = CALIBRATION_TOKENS if settings.tokens is None else settings.tokens
    with Calibration(model_path, settings.data, settings.prompt, tokens, settings.device) as calibration, \
            tqdm(total=len(names), desc="GPTQ", unit="tensor", file=sys.stderr) as bar:
        for modules in passes(order, in_features):
            hessians = calibration.hessians(modules)
            for name in [n for n in names if module[n] in modules]:
                with safe_open(files[name], framework="pt") as handle:
                    weight = handle.get_tensor(name)
                results[name] = gptq_quantize(weight, hessians.mean(module[name]), group_size)
                bar.update(1)
    return results


def _model_order(module: str) -> tuple:
    """model.layers.N.* by N, then the LM head."""
    parts = module.split(".")
    return (int(parts[2]), module) if module.startswith("model.layers.") else (1 << 30, module)


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
        given = {"data": args.calib_data, "prompt": args.calib_prompt, "tokens": args.calib_tokens,
                 "device": args.device}
        given = {key: value for key, value in given.items() if value is not None}
        calibration = CalibrationSettings(**given) if given else None
        description = quantize_checkpoint(args.model_path, args.output_dir, args.method, args.group_size,
                                          args.quantize_lm_head, args.algorithm, calibration)
        tensors = {name: kind for name, kind in description.items() if name.endswith((".weight", ".bias"))}
        int8 = sum(1 for kind in tensors.values() if kind == "W8A16")
        floats = len(tensors) - int8
        print(f"wrote {args.output_dir}: {int8} weights in int8 ({args.method}, {args.algorithm}), {floats} tensors "
              "as they were", flush=True)
        return 0

    return run_entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
