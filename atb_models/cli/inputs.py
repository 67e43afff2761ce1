"""run_pa's requests, made from its flags and checked before the model loads: the copies of one prompt (single
mode) or one prompt per entry of a folder (dataset mode), and the results file they will be written to."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from dataclasses import dataclass

from atb_models.cli.entry import one_line
from atb_models.engine.llm import RequestOutput
from atb_models.errors import UserError
from atb_models.multimodal.media import probe_media_file
from atb_models.multimodal.prompt import describe_request


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


def single_entries(paths: list[str], text: str, copies: int) -> list[Entry]:
    """The prompt's media checked now (exists, readable, known type, header decodes), before the model loads."""
    items = [{probe_media_file(path): path} for path in paths] + [{"text": text}]
    return [Entry(list(items)) for _ in range(copies)]


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


def check_results_path(path: str) -> str:
    """The file the results will replace, refused now rather than after the run when it cannot be: the results
    are written to a temporary file beside it, then renamed over it, so creating a file in its folder is probed
    the same way. Returns the path to write (a symbolic link is followed to its target)."""
    flag = "--results_save_path"
    if not path:
        raise UserError(f"{flag} is empty: give a file path such as ./results.json")
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise UserError(f"{flag} {path} is a folder: give a file path, e.g. {os.path.join(path, 'results.json')}")
    if os.path.lexists(target) and not os.path.isfile(target):
        raise UserError(f"{flag} {path} exists and is not a regular file (a device, FIFO or socket): "
                        "give the path of a regular file")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise UserError(f"{flag} {path} is read-only")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create a file in {folder}: {e.strerror}") from None
    return target


def question(items: list) -> str:
    """The request as the Question[i] line shows it: media as <kind: path>, then the text."""
    return one_line(describe_request(items))
