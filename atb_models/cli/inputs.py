"""run_pa's requests, made from its flags and checked before the model loads: the copies of one prompt (single
mode) or one prompt per entry of a folder (dataset mode), and the results file they will be written to. Torch-free
(`atb_models.cli.prepare` runs these checks before torch loads)."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from atb_models.cli.entry import one_line
from atb_models.errors import UserError
from atb_models.multimodal.media import probe_media_file

if TYPE_CHECKING:
    from atb_models.engine.llm import RequestOutput


@dataclass
class Entry:
    """One request of the run: its items, and its file name in dataset mode; `error` once it has failed.
    A dataset entry that is no request by design (a hidden file, a sub-folder) has `skipped` set instead."""

    items: list
    name: str | None = None
    error: str | None = None
    output: RequestOutput | None = None
    skipped: str | None = None


class Skipped(UserError):
    """A dataset entry left out by design, not a failure: a hidden file or a sub-folder."""


def single_prompt(paths: list[str], text: str) -> list:
    """The single-mode prompt's items, its media checked now (exists, readable, known type, header decodes), before
    the model loads. run_pa copies it once the engine has capped --max_batch_size by memory, so a huge value costs
    nothing before then."""
    return [{probe_media_file(path): path} for path in paths] + [{"text": text}]


def dataset_entries(folder: str, text: str) -> list[Entry]:
    """One entry per entry of the folder, sorted by name, each file checked before the model loads. A hidden file
    or a sub-folder is skipped, and what cannot run (a FIFO, a dangling link, a file that is no image or video)
    fails only its own entry: either way the reason is recorded in the results instead of being dropped without a
    word."""
    if not os.path.isdir(folder):
        raise UserError(f"--dataset_path {folder}: " + ("not a folder" if os.path.exists(folder) else "no such folder"))
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise UserError(f"--dataset_path {folder}: cannot list the folder: {e.strerror}") from None
    if not names:
        raise UserError(f"--dataset_path {folder}: the folder is empty")
    entries = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            entries.append(Entry([{dataset_file_kind(name, path): path}, {"text": text}], name=name))
        except Skipped as e:
            entries.append(Entry([{"file": path}], name=name, skipped=str(e)))
        except UserError as e:
            entries.append(Entry([{"file": path}, {"text": text}], name=name, error=str(e)))
    if all(entry.skipped for entry in entries):  # nothing to ask about: as good as empty
        raise UserError(f"--dataset_path {folder}: the folder holds no file to ask about, only hidden files and "
                        f"sub-folders ({len(entries)} skipped)")
    return entries


def dataset_file_kind(name: str, path: str) -> str:
    """'image' or 'video' for a regular file of the dataset folder that probes well; a UserError saying why not
    otherwise. Only a regular file is ever opened: opening a FIFO would wait for a writer forever."""
    if name.startswith("."):
        raise Skipped("a hidden file (its name starts with a dot)")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError("a symbolic link to a missing file" if os.path.islink(path)
                        else "removed while the folder was read") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError("a symbolic link loop") from None
        raise UserError(f"cannot read it: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise Skipped("a folder (sub-folders are not searched)")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise UserError(f"{kind}, not a regular file")
    return probe_media_file(path)


RESULTS_FLAG = "--results_save_path"
# Where a path names no file of the user's but a device or the kernel's view of a process (/dev/stdout,
# /proc/self/fd/1): resolved, it could name whatever the console is redirected to.
SYSTEM_FOLDERS = ("dev", "proc")


def check_results_path(path: str) -> str:
    """The file the results will replace, refused now rather than after the run when it cannot be: the results
    are written to a temporary file beside it, then renamed over it, so creating a file in its folder is probed
    the same way. Returns the path to write (a symbolic link is followed to its target)."""
    if not path:
        raise UserError(f"{RESULTS_FLAG} is empty: give a file path such as ./results.json")
    top = ("/" + os.path.abspath(path).lstrip("/")).split("/")[1]  # as given: links not followed, // as /
    if top in SYSTEM_FOLDERS:
        raise UserError(f"{RESULTS_FLAG} {path} is under /{top}, not a results file; it is left untouched: give "
                        "the path of a regular file elsewhere")
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise UserError(f"{RESULTS_FLAG} {path} is a folder: give a file path, e.g. "
                        f"{os.path.join(path, 'results.json')}")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise UserError(f"{RESULTS_FLAG} {path}: the folder {folder} does not exist")
    replaceable_results_file(target, path)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{RESULTS_FLAG} {path}: cannot create a file in {folder}: {e.strerror}") from None
    return target


def replaceable_results_file(target: str, shown_path: str) -> os.stat_result | None:
    """The status of the file at `target` that results may replace, None where there is none. Only what the kit
    writes may be replaced: a regular file, writable by its mode bits, holding a JSON object. Anything else (an
    image of the dataset, a file made read-only, the file the console is redirected to) is the user's: a UserError
    says it is left untouched. Checked before the model loads and again right before the rename, since the file
    may change during a long run."""
    try:
        status = os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{RESULTS_FLAG} {shown_path}: cannot check it: {e.strerror}; it is left untouched") from None
    if not stat.S_ISREG(status.st_mode):
        why = "exists and is not a regular file (a device, FIFO or socket)"
    elif not (_writable_by_mode(status) and os.access(target, os.W_OK)):
        why = "is read-only"
    elif not _holds_results(target):
        why = "exists and is not a results file (a JSON object of answers, as run_pa writes)"
    else:
        return status
    raise UserError(f"{RESULTS_FLAG} {shown_path} {why}; it is left untouched: give another path, or remove it")


def _writable_by_mode(status: os.stat_result) -> bool:
    """The write bit that applies to this process: the owner's for the owner and for root (os.access grants root
    every file, yet a chmod 444 says keep it), else the group's or the others'."""
    uid = os.geteuid()
    if uid in (0, status.st_uid):
        return bool(status.st_mode & stat.S_IWUSR)
    if status.st_gid == os.getegid() or status.st_gid in os.getgroups():
        return bool(status.st_mode & stat.S_IWGRP)
    return bool(status.st_mode & stat.S_IWOTH)


def is_results(value) -> bool:
    """Whether a JSON value has the shape of what run_pa writes (cli/results.py's results_of): an object whose every
    value is an answer (a string), {"error": why} or {"skipped": why}. Another JSON object (a config.json, a
    package.json) is the user's."""
    return isinstance(value, dict) and all(
        isinstance(v, str) or (isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("error", "skipped")
                               and isinstance(next(iter(v.values())), str))
        for v in value.values())


def _holds_results(path: str) -> bool:
    """Whether the regular file at `path` holds results (is_results). Opened without blocking, in case a FIFO took
    its place; anything else (an image) is told by its first bytes, before the whole file is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not f.read(64).lstrip().startswith(b"{"):
                return False
            f.seek(0)
            return is_results(json.loads(f.read()))
        except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return False


def question(items: list) -> str:
    """The request as the Question[i] line shows it: media as <kind: path>, then the text."""
    from atb_models.multimodal.prompt import describe_request

    return one_line(describe_request(items))
