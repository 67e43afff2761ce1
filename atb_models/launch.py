"""`python -m atb_models.launch [torchrun options] -m MODULE [args]`: torchrun, with a one-line failure report.

torchrun (torch.distributed.run) starts and watches the ranks; when one fails, its agent stops the others. Left
alone it then prints a report with its own Python traceback. This wrapper runs the same launcher and turns the
first failure into one line naming the rank and the cause. Ranks started this way write their error into the
error file torchrun gives them (`report_rank_failure`) instead of printing it, so the line appears once.
"""
import json
import logging
import os
import signal
import sys
import time

LAUNCHED_ENV = "ATB_MODELS_LAUNCHED"
# A rank whose collective broke because a peer failed waits this long before exiting, so that the agent sees the
# peer's own failure first and stops the job on it.
CONSEQUENCE_LINGER_S = 5.0


def report_rank_failure(message: str) -> bool:
    """In a rank started by this launcher, record `message` for the launcher to print; False elsewhere (the
    caller prints it itself)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(LAUNCHED_ENV) != "1" or not error_file:
        return False
    from atb_models.distributed import LOST_RANK_MESSAGE

    try:
        with open(error_file, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:
        return False
    if message.startswith(LOST_RANK_MESSAGE):
        time.sleep(CONSEQUENCE_LINGER_S)
    return True


def _is_consequence(failure) -> bool:
    """A rank that failed only because another one did: stopped by the agent (SIGTERM) or a broken collective."""
    from atb_models.distributed import LOST_RANK_MESSAGE

    message = failure.message if isinstance(failure.message, str) else str(failure.message)
    return failure.exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM) or message.startswith(LOST_RANK_MESSAGE)


def first_cause(failures: dict) -> tuple:
    """(rank, failure) that explains the job's end: the earliest failure that is not a consequence of another."""
    order = sorted(failures.items(), key=lambda item: (_is_consequence(item[1]), item[1].timestamp, item[0]))
    return order[0]


def _describe(failure) -> str:
    if failure.exitcode < 0:
        try:
            return f"killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            return f"killed by signal {-failure.exitcode}"
    if not os.path.isfile(failure.error_file):
        return f"exited with status {failure.exitcode} (its own output above says why)"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return message or f"exited with status {failure.exitcode}"


def main(argv=None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 and warn about it; share the node's cores among its ranks instead.
        nproc = args.nproc_per_node if str(args.nproc_per_node).isdigit() else "1"
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(nproc)))
    # The agent's own warnings ("Sending process … closing signal SIGTERM") would bury the one line that matters.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ[LAUNCHED_ENV] = "1"
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = first_cause(e.failures)
        print(f"Error: rank {rank}: {_describe(failure)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
