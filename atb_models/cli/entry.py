"""What every entry point of the kit shares: its log lines, and how it ends.

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        return run_entry_point(lambda: run(args), debug=args.debug)

`run_entry_point` turns the ways a run ends into one line and an exit status: a `UserError` (bad input) or a
`RankLost` (a rank whose peer failed) into `Error: ...` and 1, Ctrl-C into `Interrupted` and 130, SIGTERM into
`Stopped by SIGTERM` and 143, SIGHUP (the terminal closed) into `Stopped by SIGHUP` and 129, --debug showing the
traceback instead. The handlers are in place before `body` runs, so a signal during its heavy imports (torch) ends
the same way. Under `atb_models.launch` a rank hands its error to the launcher, which prints it once for the job.
Torch-free, so a parser's --help stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import sys
import threading
from typing import Callable

from atb_models.errors import RankLost, UserError
from atb_models.launch import die_with_launcher, launched, report_exit_status, report_rank_failure, stop_line

LOG_FORMAT = "[%(asctime)s] [%(levelname)s] %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"

# MindIE prints questions with \n \r \t \f \v \b and DEL replaced by spaces; other C0 controls (ESC) go the same way,
# and so do C1 controls (an 8-bit terminal's CSI) and Unicode's line and paragraph separators: a file name must not
# break a line, nor steer the terminal.
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# A line break of a many-line message, with the indentation around it.
_LINE_BREAK = re.compile(r"[ \t]*[\r\n]+[ \t]*")


def configure_logging(rank: int = 0, names: tuple[str, ...] = ("atb_models",)) -> None:
    """The kit's log lines on stderr for these loggers; only rank 0 speaks below WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    for name in names:
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        log.propagate = False


def one_line(text: str) -> str:
    """`text` with every control character (a line break, a tab, ESC) shown as a space: what every line showing a
    file name or an error message goes through, so that neither can forge a line."""
    return _CONTROL_CHARS.sub(" ", text)


def error_line(error: BaseException) -> str:
    """An error's message as one line: each line break, with its indentation, becomes one space."""
    return one_line(_LINE_BREAK.sub(" ", str(error).strip()))


def print_error(message: str) -> None:
    print(f"Error: {one_line(message)}", file=sys.stderr, flush=True)


class FlagParser(argparse.ArgumentParser):
    """argparse's parser for the kit's commands, a bad flag being bad input like any other: one `Error: ...` line
    naming it and where the flags are listed, exit status 1 (argparse prints its whole usage and exits 2)."""

    def error(self, message: str):
        print_error(f"{message} (`{self.prog} --help` lists the flags)")
        sys.exit(1)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised wherever the program was, so that it ends as on Ctrl-C (what was finished written,
    shared memory removed) but says so and exits with 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals():
    """SIGTERM, and SIGHUP unless it is ignored (nohup), raise Stopped inside the block, and Ctrl-C (unless ignored)
    KeyboardInterrupt, as always; SIGINT, SIGTERM and SIGHUP get their handlers back after it. Yields the list of the
    stop signals received in the block, first first: C code that calls back into Python (numpy's import of
    datetime) may turn the exception into one of its own, and the run must still end as stopped. Installed before
    an engine exists: shm.install_cleanup replaces only a default SIGTERM handler (the segments are still removed
    at exit)."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stopped(signum: int, frame) -> None:
        received.append(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)

    previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    signal.signal(signal.SIGTERM, stopped)
    if previous[signal.SIGHUP] == signal.SIG_DFL:  # a closed terminal ends the run as SIGTERM does
        signal.signal(signal.SIGHUP, stopped)
    if previous[signal.SIGINT] is signal.default_int_handler:  # (an ignored one, in a background job, stays so)
        signal.signal(signal.SIGINT, stopped)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def ignore_further_stops() -> None:
    """Once stopping, a second Ctrl-C, SIGTERM or SIGHUP must not cut short the writing of what was finished."""
    if threading.current_thread() is threading.main_thread():
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def run_entry_point(body: Callable[[], int], *, debug: bool = False) -> int:
    """`body()`'s exit status, or the status of the way it ended, said in one line (see the module's docstring).
    Under the launcher a rank's non-zero status is handed to it (`report_exit_status`)."""
    with stop_signals() as received:
        try:
            die_with_launcher()
            return report_exit_status(body())
        except (UserError, RankLost) as e:
            if debug:
                raise
            message = error_line(e)
            try:
                reported = report_rank_failure(message)
            except KeyboardInterrupt:  # the launcher stopped this rank while it lingered; its cause is recorded
                return 1
            if not reported:  # under the launcher the launcher prints it, once
                print_error(message)
            return 1
        except KeyboardInterrupt as e:
            return _stopped(getattr(e, "signum", signal.SIGINT))
        except Exception:
            if debug or not received:
                raise
            return _stopped(received[0])  # the signal's exception, turned into another on its way


def _stopped(signum: int) -> int:
    ignore_further_stops()
    if not launched():  # the launcher says it once for every rank
        print(stop_line(signum), file=sys.stderr, flush=True)
    return 128 + signum
