"""Files the kit writes for people (run_pa's results, the benchmark CSV, modeltest's result files): each written
atomically, and over an existing file only where that file is one the kit wrote before."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from typing import Callable

from atb_models.errors import UserError


def umask() -> int:
    """This process's file mode creation mask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def folder_problem(folder: str) -> str | None:
    """Why `folder` could neither be written in nor made, or None. Checked without making anything, so that a run
    refused or failing later leaves no empty folder behind (the writer makes it when it writes): the folder, or
    else its nearest existing ancestor, must be a folder this process can write in."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{path} is not a folder" if os.path.exists(path) else f"{path} is a link to nothing"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"cannot write in {path}"
    return None


def first_line(path: str) -> str:
    """The file's first line (up to 4 KB), decoded leniently; "" where it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(4096).split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    except OSError:
        return ""


def recognised(is_ours: Callable[[str], bool], what: str) -> Callable[[str], os.stat_result | None]:
    """A `check` for replace_file: nothing at the path, or a regular file `is_ours` recognises."""

    def check(path: str) -> os.stat_result | None:
        try:
            status = os.stat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(status.st_mode):
            raise UserError(f"{what} {path} exists and is not a regular file; it is left untouched")
        if not is_ours(path):
            raise UserError(f"{what} {path} exists and is not a file the kit wrote; it is left untouched: give "
                            "another path, or remove it")
        return status

    return check


def replace_file(path: str, data: bytes, check: Callable[[str], os.stat_result | None], what: str,
                 new_mode: int = 0o640, shown: str | None = None) -> None:
    """`data` at `path`: a temporary file beside it, synced, then renamed over it, so that an interruption or a full
    disk leaves the previous file whole and no temporary file behind. `check(path)` raises a UserError where what is
    at `path` may not be replaced, else returns its status (None: nothing there); it runs before the write and again
    right before the rename (the run may have been long). The new file keeps the previous one's mode, else
    `new_mode`. A link is followed to its file; a link to nothing is refused. Messages name `what` and `shown`
    (default: the path)."""
    shown = path if shown is None else shown
    if os.path.islink(path):
        if not os.path.exists(path):
            raise UserError(f"{what} {shown} is a link to nothing; it is left untouched")
        path = os.path.realpath(path)
    existed = check(path) is not None
    temp = None
    try:
        fd, temp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                    prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        previous = check(path)
        os.chmod(temp, stat.S_IMODE(previous.st_mode) if previous is not None else new_mode)
        os.replace(temp, path)
    except BaseException as e:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        if not isinstance(e, OSError):
            raise
        kept = "the previous file is left as it was" if existed else "nothing was written"
        raise UserError(f"{what} {shown}: cannot write: {e.strerror or e}; {kept}") from None
