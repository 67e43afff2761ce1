"""Qwen2.5-VL from the command line: `python -m examples.models.qwen2_5_vl.run_pa --help`, or run_pa.sh beside it.

The flags, the console lines and the exit statuses are run_pa's, in atb_models/cli/run_pa.py.
"""

import sys

from atb_models.cli.run_pa import Family, main as run_pa

QWEN2_5_VL = Family(name="Qwen2.5-VL", example_checkpoint="Qwen2.5-VL-7B-Instruct")


def main(argv: list[str] | None = None) -> int:
    return run_pa(argv, QWEN2_5_VL)


if __name__ == "__main__":
    sys.exit(main())
