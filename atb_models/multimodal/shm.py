"""Handing pixel tensors from a node's leader rank to the other ranks of its node through POSIX shared memory.

The leader publishes each tensor into a segment of its own and sends the small, picklable handle (name, shape,
dtype, size, crc32) by other means; a reader copies the tensor out and checks it, so a failed read raises instead
of returning garbage. The leader unlinks its segments when readers are done (`release`), and all of them when it
closes, which `install_cleanup` arranges on every exit path a process can catch. For the one it cannot (SIGKILL),
the live names are kept in a name file that the next publisher on that file, or `remove_stale_segments`, clears.

Segments are opened with `_posixshmem` (the module `multiprocessing.shared_memory` is built on) and never touch
the multiprocessing resource tracker. In Python 3.11 `SharedMemory` registers every segment it opens, attached ones
included, as "/<name>": a reader in a process with its own tracker gets the leader's segment unlinked moments after
it exits, and unregistering in the reader is wrong when it shares the leader's tracker (a multiprocessing child),
which then prints a KeyError when the leader unlinks. Lifetime here has one owner, the publisher.
"""

from __future__ import annotations

import atexit
import errno
import logging
import math
import mmap
import os
import re
import secrets
import signal
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import _posixshmem
import torch

from atb_models.errors import UserError

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "atbm_"
SEGMENT_NAME = re.compile(rf"{SEGMENT_PREFIX}(\d+)_[0-9a-f]+_\d+")  # atbm_<pid>_<publisher token>_<counter>
MAX_SEGMENT_BYTES = 4 << 30

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

    The name file (if given) always lists the live segments, one per line; a name is listed before its segment
    exists, so a crash at any point leaves nothing unlisted. Opening a name file first clears the segments of a
    dead run listed in it. Not thread-safe: publish from one thread.
    """

    def __init__(self, name_file: Optional[Union[str, os.PathLike]] = None):
        self.name_file = os.fspath(name_file) if name_file is not None else None
        self.prefix = f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"
        self._live: dict[str, None] = {}  # insertion-ordered set
        self._count = 0
        self._closed = False
        self._on_close: list = []
        if self.name_file is not None:
            removed = remove_stale_segments(self.name_file)
            if removed:
                logger.warning("removed %d shared-memory segments left by an earlier run: %s",
                               len(removed), " ".join(removed))
            self._write_name_file()

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
        self._write_name_file()
        try:
            _create_segment(name, data)
        except BaseException:
            self._live.pop(name, None)
            self._write_name_file()
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
            self._write_name_file()

    def close(self) -> None:
        """Unlink every live segment and delete the name file. Idempotent, and safe to re-enter from a signal
        handler: each segment is unlinked before it is forgotten."""
        self._closed = True
        for name in list(self._live):
            try:
                _unlink(name)
            except OSError as error:
                logger.warning("cannot unlink shared-memory segment %s: %s", name, error.strerror)
            self._live.pop(name, None)
        if self.name_file is not None:
            try:
                os.unlink(self.name_file)
            except FileNotFoundError:
                pass
        while self._on_close:
            self._on_close.pop()()

    @property
    def live_names(self) -> list[str]:
        return list(self._live)

    def __enter__(self) -> "SharedTensorPublisher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _write_name_file(self) -> None:
        """Replace the name file atomically, so a crash never leaves it half-written."""
        if self.name_file is None or self._closed:
            return
        temporary = f"{self.name_file}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w") as file:
                file.writelines(f"{name}\n" for name in self._live)
            os.replace(temporary, self.name_file)
        except OSError as error:
            raise UserError(f"cannot write the shared-memory name file {self.name_file}: {error.strerror}") from error


def read_shared_tensor(handle: SharedTensorHandle) -> torch.Tensor:
    """A new tensor holding a copy of the published one, checked against the handle's size and crc32.
    The segment itself is left for its publisher to release."""

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
    """Unlink the segments listed in a name file left by a run that could not clean up (SIGKILL), and delete the
    file. Only this kit's segment names are touched, and only those of processes no longer alive: a live run's
    segments stay, and so does the file then. Returns the names unlinked."""
    name_file = os.fspath(name_file)
    try:
        with open(name_file) as file:
            names = file.read().split()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise UserError(f"cannot read the shared-memory name file {name_file}: {error.strerror}") from error
    removed, kept = [], []
    for name in names:
        match = SEGMENT_NAME.fullmatch(name)
        if match is None:
            continue
        if _process_alive(int(match.group(1))):
            kept.append(name)
        elif _unlink(name):
            removed.append(name)
    if kept:
        logger.warning("%s lists %d shared-memory segments of a live process; left in place", name_file, len(kept))
    else:
        os.unlink(name_file)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
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
