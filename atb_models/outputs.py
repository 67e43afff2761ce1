"""Report files the kit writes for people (the benchmark CSV, modeltest's result files): each written atomically, and
over an existing file only where that file is one the kit wrote before. (run_pa's results file has its own rules,
cli/results.py: the same, plus the file's mode bits.)"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from typing import Callable

from atb_models.errors import UserError


def first_line(path: str) -> str:
    """The file's first line (up to 4 KB), decoded leniently; "" where it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(4096).split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    except OSError:
        return ""


def replace_file(path: str, data: bytes, is_ours: Callable[[str], bool], what: str) -> None:
    """`data` at `path`: a temporary file beside it, synced, then renamed over it, so that an interruption or a full
    disk leaves the previous file whole and no temporary file behind. Where something is at `path` already it must
    be a regular file that `is_ours(path)` recognises (checked again right before the rename); a link is followed to
    that file, and a link to nothing is refused. Anything else is left untouched, with a UserError naming `what`."""
    if os.path.islink(path):
        if not os.path.exists(path):
            raise UserError(f"{what} {path} is a link to nothing; it is left untouched")
        path = os.path.realpath(path)

    def check() -> None:
        try:
            status = os.stat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(status.st_mode):
            raise UserError(f"{what} {path} exists and is not a regular file; it is left untouched")
        if not is_ours(path):
            raise UserError(f"{what} {path} exists and is not a file the kit wrote; it is left untouched: give "
                            "another path, or remove it")

    check()
    existed = os.path.exists(path)
    temp = None
    try:
        fd, temp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                    prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o640)
        check()
        os.replace(temp, path)
    except BaseException as e:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        if not isinstance(e, OSError):
            raise
        kept = "the previous file is left as it was" if existed else "nothing was written"
        raise UserError(f"{what} {path}: cannot write: {e.strerror or e}; {kept}") from None
