"""What run_pa shows and keeps of its answers: MindIE's console lines, and the dataset results file, written
atomically (also when a signal cuts the run short)."""

from __future__ import annotations

import json
import logging
import sys

from atb_models.cli.entry import one_line, print_error
from atb_models.cli.inputs import RESULTS_FLAG, Entry, question, replaceable_results_file
from atb_models.errors import UserError
from atb_models.outputs import replace_file, umask

logger = logging.getLogger("atb_models.run_pa")


def print_report(entries: list[Entry], latency: float) -> None:
    """MindIE's console lines; a failed dataset entry gets an `Error: name: why` line on stderr in its place, and a
    skipped one a `Skipped: name: why` line instead of a question. A file name is shown through one_line, like the
    question: a name holding a line break or ESC must not forge a line."""
    total_tokens = 0
    for entry in entries:
        if entry.skipped is not None:
            print(f"Skipped: {one_line(entry.name)}: {one_line(entry.skipped)}", file=sys.stderr, flush=True)
    for i, entry in enumerate(entry for entry in entries if entry.skipped is None):
        print(f"Question[{i}]: {question(entry.items)}", flush=True)
        if entry.error is not None:
            print_error(f"{entry.name}: {entry.error}")
            continue
        num_tokens = len(entry.output.token_ids)  # the eos token included, as MindIE counts
        total_tokens += num_tokens
        print(f"Answer[{i}]: {entry.output.text}")
        print(f"Generate[{i}] token num: {num_tokens}", flush=True)
    print(f"Latency(s): {latency:.4f}")
    print(f"Throughput(tokens/s): {total_tokens / latency if latency > 0 else 0.0:.4f}", flush=True)


def results_of(entries: list[Entry]) -> dict:
    """{file name: answer}, {"error": why} for an entry that failed, {"skipped": why} for one skipped; unfinished
    entries left out."""
    results = {}
    for entry in entries:
        if entry.skipped is not None:
            results[entry.name] = {"skipped": entry.skipped}
        elif entry.error is not None:
            results[entry.name] = {"error": entry.error}
        elif entry.output is not None:
            results[entry.name] = entry.output.text
    return results


def save_results(entries: list[Entry], path: str, shown_path: str) -> None:
    """Write every entry's result to `path` (`shown_path` is the flag's value, for messages)."""
    results = results_of(entries)
    write_results(results, path, shown_path)
    failed = sum(entry.error is not None for entry in entries)
    skipped = sum(entry.skipped is not None for entry in entries)
    logger.info("results of %d entries (%d answered, %d failed, %d skipped) written to %s", len(results),
                len(results) - failed - skipped, failed, skipped, one_line(shown_path))


def save_finished_results(entries: list[Entry], path: str, shown_path: str) -> None:
    """On Ctrl-C or SIGTERM: the entries finished so far, so a long run cut short keeps its answers."""
    results = results_of(entries)
    answers = sum(not isinstance(result, dict) for result in results.values())
    if not results:
        print(f"no answer was finished; {one_line(shown_path)} is left as it was", file=sys.stderr, flush=True)
        return
    write_results(results, path, shown_path)
    failures = sum(entry.error is not None for entry in entries)
    print(f"wrote {answers} of {len(entries)} answers to {one_line(shown_path)} before stopping"
          + (f" (and {failures} failed entries)" if failures else ""), file=sys.stderr, flush=True)


def write_results(results: dict, path: str, shown_path: str) -> None:
    """Atomically (outputs.replace_file): a full disk or an interruption leaves the previous results file whole, and
    no temporary file behind. Whatever is at `path` right before the rename is checked again (the run may have been
    long): only a results file is replaced, keeping its mode."""
    text = json.dumps(results, sort_keys=True, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not valid UTF-8: \u escapes keep the JSON valid
        data = json.dumps(results, sort_keys=True).encode("ascii")
    replace_file(path, data, lambda target: replaceable_results_file(target, shown_path), RESULTS_FLAG,
                 0o666 & ~umask(), shown_path)
