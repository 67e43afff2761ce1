"""python -m atb_models.demo build --output DIR [--seed N]: a tiny random Qwen2-VL checkpoint to try the kit on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atb_models.cli.entry import FlagParser, configure_logging, run_entry_point
from atb_models.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="python -m atb_models.demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the demo checkpoint with sample.jpg and sample.mp4")
    build.add_argument("--output", type=Path, required=True, help="folder to build into (an earlier demo is rebuilt)")
    build.add_argument("--seed", type=int, default=0, help="seed for the random weights and sample media")
    args = parser.parse_args(argv)
    configure_logging()

    def build_it() -> int:
        from atb_models.demo.checkpoint import build_demo

        try:
            out_dir = build_demo(args.output, seed=args.seed)
        except OSError as e:  # --output a file, a path under one, or in /proc: bad input, one line, not a traceback
            raise UserError(f"--output {args.output}: cannot build the demo checkpoint there: {e}") from e
        print(f"demo checkpoint written to {out_dir} (with sample.jpg and sample.mp4)")
        print("its weights are random: it runs like Qwen2-VL, but its answers mean nothing")
        return 0

    return run_entry_point(build_it)


if __name__ == "__main__":
    from transformers.utils import logging as transformers_logging

    # transformers 4.46 warns about its own Qwen2-VL rotary constructor; users can do nothing about it.
    transformers_logging.set_verbosity_error()
    sys.exit(main())
