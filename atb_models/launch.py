"""`python -m atb_models.launch [torchrun options] -m MODULE [args]`: torchrun, with a one-line failure report.

torchrun (torch.distributed.run) starts and watches the ranks; when one fails, its agent stops the others. Left
alone it then prints a report with its own Python traceback. This wrapper runs the same launcher and turns the
first failure into one line naming the rank and the cause. Ranks started this way write their error into the
error file torchrun gives them (`report_rank_failure`) instead of printing it, so the line appears once.

It also checks, before any rank starts, that the store's port is free on the node that hosts it; ends on SIGINT or
SIGTERM with one line and 128 + the signal's number once torchrun has stopped the ranks; and tells a rank that
failed from one that finished but reported failed entries (`report_exit_status`): the latter ends the job like a
one-rank run, with the rank's own report and exit status 1, and no line of its own.
"""
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time

LAUNCHED_ENV = "ATB_MODELS_LAUNCHED"
# The launcher's process id, for its ranks to tell whether it is still their parent (die_with_launcher).
LAUNCHER_PID_ENV = "ATB_MODELS_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Where ranks record a non-zero status of a run that finished (see report_exit_status); one folder per launch.
STATUS_DIR_ENV = "ATB_MODELS_STATUS_DIR"
# The script that called the launcher (run_pa.sh sets it), named in the hint for a busy port.
SCRIPT_ENV = "ATB_MODELS_LAUNCH_SCRIPT"
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


def launched() -> bool:
    """Whether this process is a rank started by this launcher."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def die_with_launcher() -> None:
    """In a rank started by this launcher (on Linux), SIGTERM once the launcher is gone, even killed by SIGKILL,
    when torchrun's agent cannot stop the ranks: the rank then stops as on any SIGTERM (what was finished written,
    its shared memory removed) instead of running on with no parent."""
    if not launched() or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        arguments = (ctypes.c_int(PR_SET_PDEATHSIG), *(ctypes.c_ulong(v) for v in (signal.SIGTERM, 0, 0, 0)))
        if libc.prctl(*arguments) != 0:
            return
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != os.environ.get(LAUNCHER_PID_ENV, str(os.getppid())):  # (gone before the request)
        os.kill(os.getpid(), signal.SIGTERM)


def report_exit_status(status: int) -> int:
    """The exit status for a rank whose run finished with `status` (1: some dataset entries failed, already
    reported). Under this launcher a non-zero status is recorded for the launcher, which exits with it, and 0 is
    returned, so that torchrun does not take the rank for a crashed one and stop the others; elsewhere `status`."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if status == 0 or not launched() or not folder:
        return status
    try:
        with open(os.path.join(folder, f"rank{int(os.environ.get('RANK', '0'))}"), "w") as f:
            f.write(str(status))
    except (OSError, ValueError):
        return status
    return 0


def _reported_status(folder: str) -> int:
    statuses = []
    for name in os.listdir(folder):
        try:
            with open(os.path.join(folder, name)) as f:
                statuses.append(int(f.read()))
        except (OSError, ValueError):
            statuses.append(1)
    return max(statuses, default=0)


class _LaunchError(Exception):
    """The launch cannot start; its message is the one line printed."""


def _port_in_use(port: int) -> bool:
    """Whether the store could not listen on `port`: bound as torch's TCPStore binds (every address, address
    reuse on, so a port in TIME_WAIT counts as free), over IPv4 and, where there is one, IPv6."""
    families = [socket.AF_INET] + ([socket.AF_INET6] if socket.has_ipv6 else [])
    for family in families:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("::" if family == socket.AF_INET6 else "", port))
                sock.listen(1)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def check_master_port(args) -> None:
    """A busy port stops the job now, in one line, rather than in each rank's rendezvous: checked on the node that
    hosts the store (node rank 0 of a static rendezvous; --standalone picks its own port)."""
    if args.standalone or args.rdzv_backend != "static" or args.node_rank != 0:
        return
    port = int(args.master_port)
    if not _port_in_use(port):
        return
    free = next((p for p in range(port + 1, min(port + 200, 65536)) if not _port_in_use(p)), None)
    example = free if free is not None else "NNNN"
    script = os.environ.get(SCRIPT_ENV)
    hint = f"MASTER_PORT={example} bash {script} ..." if script else f"--master_port {example}"
    raise _LaunchError(f"MASTER_PORT {port} is in use on this machine (another job?): pick a free port, e.g. {hint}")


def stop_line(signum: int) -> str:
    """The one line that ends a run stopped by a signal."""
    return "Interrupted" if signum == signal.SIGINT else f"Stopped by {signal.Signals(signum).name}"


def _consequence_level(failure) -> int:
    """0: a failure of the rank's own; 1: stopped by SIGTERM, which the agent sends the others after a failure but
    which may also have come from outside; 2: a broken collective, always the consequence of another rank's end."""
    from atb_models.distributed import LOST_RANK_MESSAGE

    message = failure.message if isinstance(failure.message, str) else str(failure.message)
    if message.startswith(LOST_RANK_MESSAGE):
        return 2
    return 1 if failure.exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM) else 0


def first_cause(failures: dict) -> tuple:
    """(rank, failure) that explains the job's end: the earliest failure that is not a consequence of another
    (a rank stopped by SIGTERM explains a peer's broken collective)."""
    order = sorted(failures.items(), key=lambda item: (_consequence_level(item[1]), item[1].timestamp, item[0]))
    return order[0]


def _describe(failure) -> str:
    if failure.exitcode < 0:
        try:
            return f"killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            return f"killed by signal {-failure.exitcode}"
    if not os.path.isfile(failure.error_file):
        stopped = failure.exitcode - 128
        if stopped in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # (a rank says nothing of its stop itself)
            return f"stopped by {signal.Signals(stopped).name}"
        return f"exited with status {failure.exitcode} (its own output above says why)"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return message or f"exited with status {failure.exitcode}"


def main(argv=None) -> int:
    try:
        return _launch(argv)
    except KeyboardInterrupt:  # Ctrl-C while torch loads or the port is checked, before the agent took over SIGINT
        print(stop_line(signal.SIGINT), file=sys.stderr, flush=True)
        return 128 + signal.SIGINT


def _launch(argv) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    try:
        check_master_port(args)
    except _LaunchError as e:
        print(f"Error: {e}", file=sys.stderr, flush=True)
        return 1
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 and warn about it; share the node's cores among its ranks instead.
        nproc = args.nproc_per_node if str(args.nproc_per_node).isdigit() else "1"
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(nproc)))
    # The agent's own warnings ("Sending process … closing signal SIGTERM") would bury the one line that matters.
    # Each of its modules' loggers sets its own level (LOGLEVEL, default WARNING), so each is quieted by name.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHED_ENV] = "1"
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    from atb_models.host import process_temp_folder  # (here: host imports torch, and the ranks import this module)

    status_dir = process_temp_folder("atb_models_launch_")
    os.environ[STATUS_DIR_ENV] = status_dir
    # torchrun's default log folder (a torchelastic_* folder in the temp dir, the ranks' error files) is never
    # removed; the kit's goes with the launch. One given with --log_dir is the user's.
    log_dir = None
    if args.log_dir is None:
        args.log_dir = log_dir = process_temp_folder("atb_models_torchelastic_")
    try:
        torchrun.run(args)
        return _reported_status(status_dir)
    except ChildFailedError as e:
        rank, failure = first_cause(e.failures)
        print(f"Error: rank {rank}: {_describe(failure)}", file=sys.stderr, flush=True)
        return 1
    except SignalException as e:
        # torchrun's agent has sent the signal on to the ranks and waited for them (SIGKILL after its timeout).
        print(stop_line(e.sigval), file=sys.stderr, flush=True)
        return 128 + e.sigval
    except KeyboardInterrupt:  # before the agent took over SIGINT
        print(stop_line(signal.SIGINT), file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
