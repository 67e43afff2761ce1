"""python -m atb_models.oracle venv: create (or check) the reference venv with transformers 4.51.3 under the kit's
cache folder and print its Python. .ci/run calls it; the parity tests of Qwen2.5-VL skip without it."""
import sys

from atb_models.cli.entry import FlagParser
from atb_models.oracle import TRANSFORMERS_VERSION, ensure_venv


def main(argv=None) -> int:
    # FlagParser: a bad argument is one Error line and exit 1, as in the kit's other commands.
    parser = FlagParser(prog="python -m atb_models.oracle", description=__doc__)
    parser.add_argument("command", choices=["venv"], help=f"create the transformers {TRANSFORMERS_VERSION} venv")
    parser.parse_args(argv)
    print(ensure_venv())
    return 0


if __name__ == "__main__":
    sys.exit(main())
