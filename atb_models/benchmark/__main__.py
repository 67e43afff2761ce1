"""python -m atb_models.benchmark compare [--preset NAME] [--model_path DIR] [--quantize w8a16] [--repeats N]
                                          [--threads N]

Runs the same workloads through the kit and through transformers in one process and prints a table, then one line
per figure: speedup_vs_hf[single], speedup_vs_hf[batch16], decode_vs_floor[bs1], decode_vs_floor[bs16]; with
--quantize also decode_vs_fp32[bs1], decode_vs_floor_w8a16[bs1] and top1_agreement_w8a16.
"""

from __future__ import annotations

import argparse
import sys

from atb_models.cli.choices import DEVICE_CHOICES, DTYPE_CHOICES, QUANTIZE_CHOICES
from atb_models.cli.entry import configure_logging, run_entry_point
from atb_models.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from atb_models.benchmark.compare import WORKLOADS
    from atb_models.benchmark.presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m atb_models.benchmark", description=__doc__,
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
                         help="also run the kit quantized at load beside its float self, and end with "
                              "decode_vs_fp32[bs1], decode_vs_floor_<method>[bs1] and top1_agreement_<method>")
    compare.add_argument("--workloads", default=",".join(WORKLOADS), metavar="LIST",
                         help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    return run_entry_point(lambda: compare(args))


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
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model_path = args.model_path or str(ensure_checkpoint(preset))
    results, setup = run_compare(preset, model_path, args.dtype or preset.dtype, args.device or preset.device,
                                 repeats, workloads, args.quantize)
    print(report(results, setup, preset), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
