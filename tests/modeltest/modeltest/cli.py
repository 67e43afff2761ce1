"""`modeltest` / `python -m modeltest`: a Qwen2-VL deployment's accuracy on TextVQA or VideoBench.

    python -m modeltest --model_config_path modeltest/config/model/qwen2_vl.yaml \\
        --task_config_path modeltest/config/task/textvqa.yaml --model_path DIR --dataset_path textvqa_val.jsonl

scripts/mm_run.sh is the usual way in: it picks the two yaml files and the world size. With --world_size above 1
this command starts the ranks itself, through the kit's launcher (torchrun); every rank runs the model and rank 0
alone prints and writes. Bad input is one `Error: ...` line on stderr and exit status 1 (--debug shows the
traceback); Ctrl-C exits 130 and SIGTERM 143.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime

from atb_models import UserError
from atb_models.cli.choices import DEVICE_CHOICES, DTYPE_CHOICES, QUANTIZE_CHOICES
from atb_models.cli.entry import FlagParser, configure_logging, run_entry_point
from atb_models.launch import launched
from atb_models.ranks import env_state

from modeltest.config import load_model_config, load_task_config
from modeltest.tasks import make_task

# transformers, torch and the engine (the backends, the evaluation and the report import them) load inside run(),
# within run_entry_point: a Ctrl-C during those seconds of imports then ends in `Interrupted`, not a traceback.

BACKENDS = ("pa", "hf")
DEFAULT_MASTER_PORT = "20050"


def _subset_keys(text: str) -> list[str]:
    """--subsets' keys: at least one, none empty (an empty list would run every subset)."""
    keys = text.split(",")
    if not all(key.strip() for key in keys):
        raise argparse.ArgumentTypeError(f"{text!r}: give subset keys separated by commas, none empty")
    return [key.strip() for key in keys]


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="modeltest", description=__doc__.split("\n\n")[0])
    required = parser.add_argument_group("required")
    required.add_argument("--model_config_path", required=True, metavar="YAML", help="model yaml, e.g. "
                          "modeltest/config/model/qwen2_vl.yaml")
    required.add_argument("--task_config_path", required=True, metavar="YAML", help="task yaml, e.g. "
                          "modeltest/config/task/textvqa.yaml")
    parser.add_argument("--model_path", metavar="DIR", help="checkpoint folder (default: the model yaml's model_path)")
    parser.add_argument("--dataset_path", metavar="PATH", help="TextVQA: textvqa_val.jsonl or its folder; VideoBench: "
                        "the Eval_QA folder (default: the task yaml's local_dataset_path)")
    parser.add_argument("--subsets", metavar="KEY[,KEY...]", type=_subset_keys,
                        help="run only these subsets of the task yaml's subject_mapping")
    parser.add_argument("--output_dir", metavar="DIR", default="output",
                        help="results go under DIR/<date>/modeltest/<model>/precision_result/ (default: %(default)s)")
    parser.add_argument("--world_size", type=int, metavar="N",
                        help="ranks, one per device; above 1 this command starts them through python -m "
                             f"atb_models.launch (torchrun, MASTER_PORT default {DEFAULT_MASTER_PORT}) (default: the "
                             "launcher's WORLD_SIZE, else 1)")
    parser.add_argument("--batch_size", type=int, metavar="N", default=1,
                        help="requests the engine runs at once, with continuous batching (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="pa",
                        help="pa: the kit's paged-attention engine; hf: transformers' reference model on the same "
                             "inputs, one sample at a time (default: %(default)s)")
    parser.add_argument("--max_output_length", type=int, metavar="N",
                        help="tokens generated per answer (default: the model yaml's infer_params.max_output_length)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES,
                        help="compute dtype (default: the model yaml's data_type)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="auto: npu, then cuda, then cpu (default: %(default)s)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="pa only: the language model's linears in int8 (quantized as they load); results are "
                             "named pa_w8a16 beside the float run's pa")
    parser.add_argument("--no_prefix_caching", dest="enable_prefix_caching", action="store_false",
                        help="pa only: compute every prompt in full instead of reusing the KV blocks and image "
                             "features a sample shares with earlier ones (the answers are the same either way)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    return parser


def make_backend(name: str, model, task_config, args, max_new_tokens: int):
    from modeltest.backends import HFBackend, KitBackend

    dtype = args.dtype or model.data_type
    if name == "hf":
        if args.quantize:
            raise UserError("--quantize runs the kit's engine: it does not apply to --backend hf")
        return HFBackend(model, task_config, max_new_tokens, dtype, args.device)
    return KitBackend(model, task_config, args.batch_size, max_new_tokens, dtype, args.device, args.quantize,
                      args.enable_prefix_caching)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from modeltest.evaluate import metric_rows, run_subset
    from modeltest.report import (OutputLayout, append_debug, check_output_dir, metric_table, write_result_csv,
                                  write_result_report)

    ranks = env_state()
    rank, world_size = ranks.rank, ranks.world_size
    transformers_logging.set_verbosity_error()  # its notes on its own Qwen2-VL classes are nothing to act on
    configure_logging(rank, names=("atb_models", "modeltest"))
    if args.world_size is not None and args.world_size != world_size:
        raise UserError(f"--world_size {args.world_size}, but this process is one of {world_size} ranks")
    model = load_model_config(args.model_config_path, args.model_path)
    task_config = load_task_config(args.task_config_path, args.dataset_path, args.subsets)
    max_new_tokens = model.infer_params.max_output_length if args.max_output_length is None else args.max_output_length
    if max_new_tokens < 1 or args.batch_size < 1:
        raise UserError("--max_output_length and --batch_size must be positive integers")
    if max_new_tokens > task_config.requested_max_output_length:
        raise UserError(f"{max_new_tokens} output tokens per answer exceed the task's requested_max_output_length "
                        f"{task_config.requested_max_output_length}")
    if args.backend == "hf" and (world_size > 1 or args.batch_size > 1):
        raise UserError("--backend hf runs one sample at a time on one rank: use --world_size 1 and --batch_size 1")
    task = make_task(task_config, model)
    if rank == 0:
        check_output_dir(args.output_dir)

    started = datetime.now()
    clock = time.perf_counter()
    backend = make_backend(args.backend, model, task_config, args, max_new_tokens)
    loaded = time.perf_counter()
    layout = None
    if rank == 0:
        layout = OutputLayout.for_run(args.output_dir, started, model.model_name, task.name, backend.plan,
                                      backend.name, args.batch_size, world_size)
    results_by_subset = []
    for number, subset in enumerate(task.subsets, start=1):
        say(rank, f"Subdataset {number} / {len(task.subsets)}, task name: {subset.name} START:")
        results = run_subset(task, subset, backend, rank_zero=rank == 0)
        if results is not None:
            append_debug(layout, results)
            results_by_subset.append((subset.name, results))
        say(rank, f"Subdataset {number} / {len(task.subsets)}, task name: {subset.name} END.")
    if rank != 0:
        return 0

    rows = metric_rows(task, results_by_subset)
    everything = [result for _, results in results_by_subset for result in results]
    failures = [result for result in everything if result.error is not None]
    settings = {
        "task": f"{task.name} ({', '.join(subset.name for subset in task.subsets)})",
        "dataset": task_config.local_dataset_path,
        "model": f"{model.model_name}: {model.model_path}",
        "backend": f"{backend.name}: {backend.description}",
        "device": backend.plan.describe(),
        "world size / batch size": f"{world_size} / {args.batch_size}",
        "tokens: max input / max output / per answer":
            f"{task_config.requested_max_input_length} / {task_config.requested_max_output_length} / {max_new_tokens}",
        "video fps": model.infer_params.video_fps,
        "started": f"{started:%Y-%m-%d %H:%M:%S}",
        "seconds, model loading included": f"{time.perf_counter() - clock:.1f}",
        "seconds answering (after loading)": f"{time.perf_counter() - loaded:.1f}",
        "samples / failed": f"{len(everything)} / {len(failures)}",
        "per-sample records": str(layout.samples_jsonl),
        "per-sample output lines": str(layout.outputs_txt),
    }
    write_result_csv(layout.result_csv, rows)
    write_result_report(layout.result_report, settings, rows, task.metrics)
    print("Metric Table:")
    print(metric_table(rows, task.metrics))
    print(f"{task.name} test result saved to: {layout.result_csv}")
    print(f"per-sample records: {layout.samples_jsonl}", flush=True)
    if failures and len(failures) == len(everything):
        raise UserError(f"all {len(everything)} samples failed; the first: {failures[0].error}")
    if failures:
        print(f"Warning: {len(failures)} of {len(everything)} samples failed (counted as wrong); the first: "
              f"{failures[0].error}", file=sys.stderr)
    return 0


def say(rank: int, line: str) -> None:
    if rank == 0:
        print(line, flush=True)


def start_ranks(world_size: int, argv: list[str]) -> int:
    """Run this same command line on `world_size` ranks of this node through the kit's launcher."""
    from atb_models.launch import main as launch

    return launch(["--nproc_per_node", str(world_size), "--master_port",
                   os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT), "-m", "modeltest", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)

    def start() -> int:
        if args.world_size is not None and args.world_size < 1:
            raise UserError(f"--world_size must be a positive integer, got {args.world_size}")
        if args.world_size is not None and args.world_size > 1 and not launched():
            return start_ranks(args.world_size, argv)
        return run(args)

    return run_entry_point(start, debug=args.debug)
