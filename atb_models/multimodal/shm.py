"""Handing pixel tensors from a node's leader rank to the other ranks of its node through POSIX shared memory.

The leader publishes each tensor into a segment of its own and sends the small, picklable handle (name, shape,
dtype, size, crc32) by other means; a reader copies the tensor out and checks it, so a failed read raises instead
of returning garbage. The leader unlinks its segments when readers are done (`release`), and all of them when it
closes, which `install_cleanup` arranges on every exit path a process can catch. For the one it cannot (SIGKILL),
the live names are kept in a name file that the next publisher on that file, or `remove_stale_segments`, clears.

The name file (`--shm_name_save_path`) is shared: every run given the same path lists its segments in it, so two
runs in one folder never lose track of each other's, and one `--cleanup_shm` finds the stale segments of all of
them. Its first line is `NAME_FILE_HEADER`; a file without it was not written by this kit and is never rewritten
or removed (an error says so, and the file is left as it was). Each change (add or drop one publisher's names)
is a read-modify-replace under an exclusive `flock` of the file: the new list is written to a temporary file
beside it and renamed over it, so a crash never leaves it half-written, and whoever waited on the lock of a file
that was replaced or removed meanwhile starts again on the one now at the path. The file goes when its last
name does.

Segments are opened with `_posixshmem` (the module `multiprocessing.shared_memory` is built on) and never touch
the multiprocessing resource tracker. In Python 3.11 `SharedMemory` registers every segment it opens, attached ones
included, as "/<name>": a reader in a process with its own tracker gets the leader's segment unlinked moments after
it exits, and unregistering in the reader is wrong when it shares the leader's tracker (a multiprocessing child),
which then prints a KeyError when the leader unlinks. Lifetime here has one owner, the publisher.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import math
import mmap
import os
import re
import secrets
import signal
import stat
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Union

import _posixshmem

from atb_models.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are made: --cleanup_shm runs without it
    import torch

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "atbm_"
SEGMENT_NAME = re.compile(rf"{SEGMENT_PREFIX}(\d+)_[0-9a-f]+_\d+")  # atbm_<pid>_<publisher token>_<counter>
MAX_SEGMENT_BYTES = 4 << 30
NAME_FILE_HEADER = "# atb_models shared-memory segments v1"
NAME_FILE_LOCK_TIMEOUT_S = 30.0  # a change holds the lock for a few file operations; waiting longer means a hang

# Signals whose default action ends the process; install_cleanup turns them into a clean exit.
TERMINATING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SharedMemoryError(RuntimeError):
    """A tensor could not be put into, or read back from, shared memory."""


@dataclass(frozen=True)
class SharedTensorHandle:
    """What another process needs to read one published tensor. An empty tensor has no segment (name "")."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    nbytes: int
    crc32: int


def _posix_name(name: str) -> str:
    return "/" + name


def _unlink(name: str) -> bool:
    """Unlink one segment; False when it was already gone."""
    try:
        _posixshmem.shm_unlink(_posix_name(name))
    except FileNotFoundError:
        return False
    return True


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor's storage."""
    import torch

    return tensor.reshape(-1).view(torch.uint8)


def _create_segment(name: str, data: torch.Tensor) -> None:
    """Create segment `name` holding the bytes of `data` (flat uint8, non-empty). Nothing is left behind on failure."""
    fd = _posixshmem.shm_open(_posix_name(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        try:
            # Reserve the pages now: an ftruncate'd segment on a full /dev/shm would SIGBUS on the copy below.
            os.posix_fallocate(fd, 0, data.numel())
        except OSError as error:
            hint = " (enlarge /dev/shm, e.g. docker run --shm-size)" if error.errno == errno.ENOSPC else ""
            raise SharedMemoryError(
                f"shared-memory segment {name}: cannot allocate {data.numel()} bytes: {error.strerror}{hint}"
            ) from error
        with mmap.mmap(fd, data.numel()) as segment, memoryview(segment) as view:
            view[:] = data.numpy()
    except BaseException:
        _unlink(name)
        raise
    finally:
        os.close(fd)


class SharedTensorPublisher:
    """Owned by the node leader: puts tensors into shared memory and owns every segment it creates.

    The name file (if given) always lists this publisher's live segments, beside those of the other runs that
    share the file; a name is listed before its segment exists, so a crash at any point leaves nothing unlisted.
    Opening a name file first clears the segments of dead runs listed in it. Not thread-safe: publish from one
    thread.
    """

    def __init__(self, name_file: Optional[Union[str, os.PathLike]] = None):
        self.name_file = os.fspath(name_file) if name_file is not None else None
        self.prefix = f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"
        self._live: dict[str, None] = {}  # insertion-ordered set
        self._count = 0
        self._closed = False
        self._editing = False  # inside a name-file change: a signal handler's close() must not wait for our lock
        self._on_close: list = []
        if self.name_file is not None:
            removed = []
            self._edit_name_file(lambda names: _drop_dead(names, removed), keep_empty=True)
            log_removed_segments(removed)

    def publish(self, tensor: torch.Tensor) -> SharedTensorHandle:
        """Copy `tensor` into a new segment and return its handle."""
        if self._closed:
            raise ValueError("publish() on a closed SharedTensorPublisher")
        tensor = tensor.detach().cpu().contiguous()
        shape = tuple(tensor.shape)
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.nbytes > MAX_SEGMENT_BYTES:
            raise SharedMemoryError(
                f"tensor {list(shape)} {dtype} is {tensor.nbytes} bytes, over the {MAX_SEGMENT_BYTES}-byte "
                f"limit of one shared-memory segment"
            )
        if tensor.nbytes == 0:
            return SharedTensorHandle(name="", shape=shape, dtype=dtype, nbytes=0, crc32=0)

        data = _as_bytes(tensor)
        name = f"{self.prefix}{self._count}"
        self._count += 1
        self._live[name] = None
        self._list_live_names()
        try:
            _create_segment(name, data)
        except BaseException:
            self._live.pop(name, None)
            self._list_live_names()
            raise
        return SharedTensorHandle(name=name, shape=shape, dtype=dtype, nbytes=tensor.nbytes,
                                  crc32=zlib.crc32(data.numpy()))

    def release(self, handles: Iterable[SharedTensorHandle]) -> None:
        """Unlink these segments now (every reader has its copy). Unknown or already released handles are ignored."""
        names = [handle.name for handle in handles if handle.name in self._live]
        for name in names:
            _unlink(name)
            self._live.pop(name, None)
        if names:
            self._list_live_names()

    def close(self) -> None:
        """Unlink every live segment and take this publisher's names out of the name file (deleting it when no
        other run's names remain). Idempotent, and safe to re-enter from a signal handler: each segment is unlinked
        before it is forgotten, and a close that interrupts a name-file change leaves the file to list names whose
        segments are gone, which the next publisher or cleanup drops."""
        was_closed, self._closed = self._closed, True
        for name in list(self._live):
            try:
                _unlink(name)
            except OSError as error:
                logger.warning("cannot unlink shared-memory segment %s: %s", name, error.strerror)
            self._live.pop(name, None)
        if self.name_file is not None and not was_closed and not self._editing:
            try:
                self._edit_name_file(self._with_live_names, keep_empty=False)
            except UserError as error:  # close runs at exit and in signal handlers: report, never raise
                logger.warning("%s", error)
        while self._on_close:
            self._on_close.pop()()

    @property
    def live_names(self) -> list[str]:
        return list(self._live)

    def __enter__(self) -> "SharedTensorPublisher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _with_live_names(self, names: list[str]) -> list[str]:
        """The name file's list with this publisher's names replaced by its live ones."""
        return [name for name in names if not name.startswith(self.prefix)] + list(self._live)

    def _list_live_names(self) -> None:
        if self.name_file is not None and not self._closed:
            self._edit_name_file(self._with_live_names, keep_empty=True)

    def _edit_name_file(self, edit: Callable[[list[str]], list[str]], keep_empty: bool) -> None:
        self._editing = True
        try:
            _edit_name_file(self.name_file, edit, keep_empty)
        finally:
            self._editing = False


def read_shared_tensor(handle: SharedTensorHandle) -> torch.Tensor:
    """A new tensor holding a copy of the published one, checked against the handle's size and crc32.
    The segment itself is left for its publisher to release."""
    import torch

    def fail(reason: str) -> SharedMemoryError:
        return SharedMemoryError(f"shared-memory segment {handle.name or '(none)'}: {reason}")

    dtype = getattr(torch, handle.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise fail(f"unknown dtype {handle.dtype!r}")
    expected = math.prod(handle.shape) * dtype.itemsize
    if handle.nbytes != expected:
        raise fail(f"handle says {handle.nbytes} bytes, but {list(handle.shape)} {handle.dtype} is {expected}")
    tensor = torch.empty(handle.shape, dtype=dtype)
    if handle.nbytes == 0:
        return tensor
    if not SEGMENT_NAME.fullmatch(handle.name):
        raise fail("not a segment name of this kit")

    try:
        fd = _posixshmem.shm_open(_posix_name(handle.name), os.O_RDONLY)
    except FileNotFoundError:
        raise fail("not found (released already, or its publisher exited)") from None
    except OSError as error:
        raise fail(f"cannot open: {error.strerror}") from error
    try:
        size = os.fstat(fd).st_size
        if size != handle.nbytes:
            raise fail(f"holds {size} bytes, the handle says {handle.nbytes}")
        data = _as_bytes(tensor).numpy()
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as segment, memoryview(segment) as view:
            data[:] = view
    finally:
        os.close(fd)
    # Checked on the copy: the bytes returned are the bytes checked.
    crc = zlib.crc32(data)
    if crc != handle.crc32:
        raise fail(f"checksum mismatch (crc32 {crc:#010x}, the handle says {handle.crc32:#010x})")
    return tensor


def remove_stale_segments(name_file: Union[str, os.PathLike]) -> list[str]:
    """Unlink the segments listed in a name file by runs that could not clean up (SIGKILL) and take their names
    out of it; the file goes when no names remain. Only this kit's segment names are touched, and only those of
    processes no longer alive: a live run's segments stay listed. Returns the names unlinked. A missing file is
    nothing to do; a file that is not a name file of this kit raises UserError and stays as it was."""
    name_file = os.fspath(name_file)
    removed = []
    kept = _edit_name_file(name_file, lambda names: _drop_dead(names, removed), keep_empty=False)
    if kept:
        logger.warning("%s lists %d shared-memory segments of a live process; left in place", name_file, len(kept))
    return removed


def log_removed_segments(removed: list[str]) -> None:
    if removed:
        logger.warning("removed %d shared-memory segments left by an earlier run: %s", len(removed), " ".join(removed))


def _drop_dead(names: list[str], removed: list[str]) -> list[str]:
    """The names of live processes; the segments of dead ones are unlinked (appended to `removed`), and lines
    that are no segment name of this kit dropped."""
    kept = []
    for name in names:
        match = SEGMENT_NAME.fullmatch(name)
        if match is None:
            continue
        if _process_alive(int(match.group(1))):
            kept.append(name)
        elif _unlink(name):
            removed.append(name)
    return kept


def _edit_name_file(path: str, edit: Callable[[list[str]], list[str]], keep_empty: bool) -> list[str]:
    """Replace the name list at `path` by `edit(list)` under the file's lock, and return the new list. Without
    names left the file is removed, unless `keep_empty` (then one is created if there was none). `edit` may run
    again if another process replaced the file meanwhile. UserError if the file is not ours or cannot be written."""
    while True:
        fd = _open_name_file(path)
        if fd is None:
            names = edit([])
            if (names or keep_empty) and not _create_name_file(path, names):
                continue  # another process created it meanwhile
            return names
        try:
            _lock(fd, path)
            if not _still_at(fd, path):
                continue  # replaced or removed while we waited for its lock
            names = edit(_read_names(fd))
            if names or keep_empty:
                _replace_name_file(path, names)
            else:
                os.unlink(path)
            return names
        finally:
            os.close(fd)  # releases the lock


def _name_file_error(path: str, reason: str) -> UserError:
    return UserError(f"--shm_name_save_path {path} {reason}; left untouched: give the path of a new file or of a "
                     f"name file of this kit (first line {NAME_FILE_HEADER!r})")


def _open_name_file(path: str) -> Optional[int]:
    """An open descriptor of the name file at `path`, its header checked; None when there is no file. Anything
    else at the path (another file, a link, a directory, a device) is refused without being opened for writing."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UserError(f"cannot read the shared-memory name file {path}: {error.strerror}") from error
    if stat.S_ISLNK(status.st_mode):
        raise _name_file_error(path, "is a symbolic link")
    if not stat.S_ISREG(status.st_mode):
        raise _name_file_error(path, "is not a regular file")
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, os.O_RDWR | flags)  # a read-only descriptor cannot take an exclusive lock over NFS
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | flags)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UserError(f"cannot read the shared-memory name file {path}: {error.strerror}") from error
    header = (NAME_FILE_HEADER + "\n").encode()
    if os.pread(fd, len(header), 0) != header:
        os.close(fd)
        raise _name_file_error(path, "is not a shared-memory name file of this kit (its first line is not the header)")
    return fd


def _lock(fd: int, path: str) -> None:
    deadline = time.monotonic() + NAME_FILE_LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise UserError(f"--shm_name_save_path {path}: still locked by another process after "
                                f"{NAME_FILE_LOCK_TIMEOUT_S:.0f} s") from None
            time.sleep(0.005)


def _still_at(fd: int, path: str) -> bool:
    """Whether the open file is still the one at `path` (a change replaces the file, a last close removes it)."""
    try:
        at_path = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (at_path.st_dev, at_path.st_ino) == (mine.st_dev, mine.st_ino)


def _read_names(fd: int) -> list[str]:
    with os.fdopen(os.dup(fd), "rb") as file:
        text = file.read().decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _name_file_text(names: list[str]) -> str:
    return "".join(f"{line}\n" for line in [NAME_FILE_HEADER, *names])


def _write_temporary(path: str, names: list[str]) -> str:
    """A new file beside `path` holding the header and `names`; its path."""
    folder, base = os.path.split(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise UserError(f"cannot write the shared-memory name file {path}: {error.strerror}") from error
    try:
        with os.fdopen(fd, "w") as file:
            file.write(_name_file_text(names))
    except BaseException as error:
        os.unlink(temporary)
        if isinstance(error, OSError):
            raise UserError(f"cannot write the shared-memory name file {path}: {error.strerror}") from error
        raise
    return temporary


def _replace_name_file(path: str, names: list[str]) -> None:
    temporary = _write_temporary(path, names)
    try:
        os.replace(temporary, path)
    except BaseException as error:
        os.unlink(temporary)
        if isinstance(error, OSError):
            raise UserError(f"cannot write the shared-memory name file {path}: {error.strerror}") from error
        raise


def _create_name_file(path: str, names: list[str]) -> bool:
    """Create the name file at `path` whole, never over an existing file: False if one appeared meanwhile."""
    temporary = _write_temporary(path, names)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise UserError(f"cannot write the shared-memory name file {path}: {error.strerror}") from error
        # A filesystem without hard links: create in place, still never over an existing file.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as file:
            file.write(_name_file_text(names))
    finally:
        os.unlink(temporary)
    return True


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no process can have (a damaged list)
        return False
    except PermissionError:
        return True
    return True


# install_cleanup: one signal handler for all publishers registered in this process.
_cleanup_publishers: list[SharedTensorPublisher] = []
_replaced_handlers: dict[int, object] = {}


def install_cleanup(publisher: SharedTensorPublisher) -> None:
    """Make sure `publisher.close()` runs however this process ends, short of SIGKILL. Call from the main thread.

    - normal exit, an uncaught exception, sys.exit: atexit.
    - SIGTERM, SIGHUP (and SIGINT if it has no Python handler): where the handler is the default (terminate), it
      becomes one that closes every registered publisher and raises SystemExit(128 + signal), so finally blocks
      and atexit still run. An ignored signal (SIGHUP under nohup) stays ignored; a handler installed by someone
      else is left alone, since it decides whether the process ends (and if it ends, atexit closes).
    - Ctrl-C: Python's own SIGINT handler raises KeyboardInterrupt; uncaught, it ends in atexit, then the process
      ends by SIGINT as usual.
    The replaced handlers come back when the last registered publisher closes.
    """
    if publisher in _cleanup_publishers:
        return
    if not _cleanup_publishers:
        for signum in TERMINATING_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_DFL:
                signal.signal(signum, _close_and_exit)
                _replaced_handlers[signum] = previous
    _cleanup_publishers.append(publisher)
    atexit.register(publisher.close)
    publisher._on_close.append(lambda: _uninstall_cleanup(publisher))


def _close_and_exit(signum: int, frame) -> None:
    for publisher in list(_cleanup_publishers):
        publisher.close()
    raise SystemExit(128 + signum)


def _uninstall_cleanup(publisher: SharedTensorPublisher) -> None:
    atexit.unregister(publisher.close)
    if publisher in _cleanup_publishers:
        _cleanup_publishers.remove(publisher)
    if _cleanup_publishers:
        return
    for signum, previous in list(_replaced_handlers.items()):
        if signal.getsignal(signum) is _close_and_exit:
            signal.signal(signum, previous)
        del _replaced_handlers[signum]
