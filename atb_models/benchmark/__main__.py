"""python -m atb_models.benchmark compare [--preset NAME] [--model_path DIR] [--quantize w8a16 [--quant_algorithm A]]
                                          [--repeats N] [--threads N]
python -m atb_models.benchmark serve [--url URL | --model_path DIR] [--concurrency 1,4,16] [--compare_generate]
                                        [--repeats N]

Runs the same workloads through the kit and through transformers in one process and prints a table, then one line
per figure: speedup_vs_hf[single], speedup_vs_hf[batch16], decode_vs_floor[bs1], decode_vs_floor[bs16]; with
--quantize also decode_vs_fp32[bs1], decode_vs_floor_w8a16[bs1] and top1_agreement_w8a16; with a bfloat16 language
model (--dtype bfloat16) also decode_bf16_vs_fp32[bs1], against a float32 kit timed in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

from atb_models.cli.choices import DEVICE_CHOICES, DTYPE_CHOICES, QUANT_ALGORITHM_CHOICES, QUANTIZE_CHOICES
from atb_models.cli.entry import FlagParser, configure_logging, run_entry_point
from atb_models.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from atb_models.benchmark.compare import WORKLOADS
    from atb_models.benchmark.presets import PRESETS

    parser = FlagParser(prog="python -m atb_models.benchmark", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="the kit against transformers and against the decode floor")
    compare.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                         help="workload sizes and, without --model_path, the random checkpoint to build once: "
                              + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    compare.add_argument("--model_path", metavar="DIR", help="run the preset's workloads on this checkpoint instead")
    compare.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: the preset's")
    compare.add_argument("--device", choices=DEVICE_CHOICES, help="default: the preset's")
    compare.add_argument("--repeats", type=int, metavar="N", help="timed runs per workload and side (default: the "
                                                                    "preset's)")
    compare.add_argument("--threads", type=int, metavar="N",
                         help="torch CPU threads (default: torch's, one per core); where other work shares the "
                              "cores, fewer threads keep them from waiting on a descheduled sibling")
    compare.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                         help="also run the kit quantized beside its float self, and end with "
                              "decode_vs_fp32[bs1], decode_vs_floor_<method>[bs1] and top1_agreement_<method>")
    compare.add_argument("--quant_algorithm", choices=QUANT_ALGORITHM_CHOICES, default="gptq",
                         help="with --quantize: gptq (default) runs the quantize tool's calibrated checkpoint (made "
                              "once for a preset's checkpoint, minutes); rtn quantizes at load, no data")
    compare.add_argument("--workloads", default=",".join(WORKLOADS), metavar="LIST",
                         help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    add_serve_parser(commands)
    return parser


def add_serve_parser(commands) -> None:
    from atb_models.benchmark.presets import PRESETS
    from atb_models.cli.run_pa import positive_int_list

    serve = commands.add_parser("serve", help="an OpenAI-compatible server under load (like vllm bench serve)")
    serve.add_argument("--url", help="a running server (http://HOST:PORT); default: start one on the preset's "
                                     "checkpoint or --model_path, stopped at the end")
    serve.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                       help="the requests' sizes and, without --model_path or --url, the checkpoint to serve")
    serve.add_argument("--model_path", metavar="DIR", help="serve this checkpoint instead of the preset's")
    serve.add_argument("--api_key", metavar="KEY", help="the server's --api_key, if it has one")
    serve.add_argument("--dtype", choices=DTYPE_CHOICES, help="a started server's (default: the preset's)")
    serve.add_argument("--device", choices=DEVICE_CHOICES, help="a started server's (default: the preset's)")
    serve.add_argument("--concurrency", type=positive_int_list, default=[1, 4, 16], metavar="LIST",
                       help="requests in flight at most, one run per value (default 1,4,16)")
    serve.add_argument("--num_requests", type=int, default=16, metavar="N", help="requests per run (default 16)")
    serve.add_argument("--request_rate", type=float, default=float("inf"), metavar="R",
                       help="mean arrivals per second, exponentially spaced (default inf: all at once)")
    serve.add_argument("--compare_generate", action="store_true",
                       help="with a started server: the server at concurrency 16 and LLM.generate on the same 16 "
                            "requests as one batch, timed in turn (--repeats times), and the median ratio of their "
                            "output tokens/s")
    serve.add_argument("--repeats", type=int, default=3, metavar="N",
                       help="paired runs of --compare_generate (default 3)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    return run_entry_point(lambda: serve(args) if args.command == "serve" else compare(args))


def serve(args: argparse.Namespace) -> int:
    from atb_models.benchmark.presets import PRESETS, ensure_checkpoint
    from atb_models.benchmark.serve_bench import run_serve_benchmark

    preset = PRESETS[args.preset]
    if args.num_requests < 1 or args.repeats < 1 or not args.request_rate > 0:
        raise UserError("--num_requests and --repeats must be at least 1 and --request_rate above 0")
    model_path = None if args.url else args.model_path or str(ensure_checkpoint(preset))
    print(run_serve_benchmark(preset, model_path, args.url.rstrip("/") if args.url else None, args.api_key,
                              args.dtype or preset.dtype, args.device or preset.device, args.concurrency,
                              args.num_requests, args.request_rate, args.compare_generate, args.repeats),
          flush=True)
    return 0


def compare(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # its generation-config notes say nothing about speed
    import torch

    from atb_models.benchmark.compare import WORKLOADS, report, run_compare
    from atb_models.benchmark.presets import PRESETS, ensure_checkpoint

    preset = PRESETS[args.preset]
    workloads = tuple(w for w in args.workloads.split(",") if w)
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown or not workloads:
        raise UserError(f"--workloads {args.workloads}: choose from {','.join(WORKLOADS)}")
    repeats = preset.repeats if args.repeats is None else args.repeats
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if args.threads is not None:
        if not 1 <= args.threads <= 4 * (os.cpu_count() or 1):  # (beyond that, OpenMP's stacks fail to map)
            raise UserError(f"--threads must be 1 to {4 * (os.cpu_count() or 1)} (4 per core here), got "
                            f"{args.threads}")
        torch.set_num_threads(args.threads)
    model_path = args.model_path or str(ensure_checkpoint(preset))
    results, setup = run_compare(preset, model_path, args.dtype or preset.dtype, args.device or preset.device,
                                 repeats, workloads, args.quantize, args.quant_algorithm)
    print(report(results, setup, preset), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
