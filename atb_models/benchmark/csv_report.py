"""The benchmark CSV of `run_pa` (MindIE's ten columns, CONTRACT.md) from one generate() call's step records.

Definitions, where MindIE's differ said so:
- a step is timed from just before the model's forward to the sampled tokens, device synchronised; preprocessing
  (image decoding, resizing, tokenising) and the scheduler's host work between steps are outside every step;
- `prefill_time` is the sum of the prefill steps: the first-token time when the batch fits one prefill step;
- `decoder_token_time` is the sum of the decode steps divided by the number of decode steps actually run (MindIE
  divides by the configured max_new_tokens - 1, which understates it when outputs stop early); with speculative
  decoding a step gives a request 1 to num_speculative_tokens + 1 tokens, and this stays a step's time (the
  throughput counts the tokens);
- `e2e_time` is prefill_time plus the sum of the decode steps (the wall-clock latency is run_pa's `Latency(s)`);
- `batch_size` counts the requests that ran (one that failed in preprocessing never reached a step), and
  `prefill_average_time` is prefill_time divided by it;
- `input_seq_len` is the longest prompt (visual tokens included) and `output_seq_len` the most tokens any request
  generated (MindIE writes the first request's prompt and the configured maximum).

After MindIE's ten columns come the kit's own two: the run's prompt tokens whose K/V came from the prefix cache and
its images / videos that skipped the vision tower (RequestOutput.cached_prompt_tokens, cached_visual_items, summed).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass

from atb_models.errors import UserError
from atb_models.outputs import first_line, folder_problem, recognised, replace_file

ENABLE_VARIABLE = "ATB_LLM_BENCHMARK_ENABLE"
PATH_VARIABLE = "ATB_LLM_BENCHMARK_FILEPATH"
DEFAULT_PATH = os.path.join(".", "benchmark_result", "benchmark.csv")

COLUMNS = ("batch_size", "input_seq_len", "output_seq_len", "e2e_time(ms)", "prefill_time(ms)",
           "decoder_token_time(ms)", "prefill_count", "prefill_token_times", "decode_token_times",
           "prefill_average_time(ms)", "cached_prompt_tokens", "cached_visual_items")


def benchmark_enabled() -> bool:
    return os.environ.get(ENABLE_VARIABLE, "0") == "1"


def benchmark_path() -> str:
    """ATB_LLM_BENCHMARK_FILEPATH, else ./benchmark_result/benchmark.csv in the current directory (as MindIE)."""
    return os.environ.get(PATH_VARIABLE) or DEFAULT_PATH


@dataclass
class RunSummary:
    batch_size: int
    input_seq_len: int
    output_seq_len: int
    prefill_seconds: list[float]
    decode_seconds: list[float]
    output_tokens: int              # all requests' generated tokens, for the throughput
    cached_prompt_tokens: int = 0   # prompt tokens read from the prefix cache, all requests
    cached_visual_items: int = 0    # images / videos that skipped the vision tower, all requests

    @classmethod
    def from_run(cls, step_records: list, outputs: list) -> "RunSummary":
        """From `LLM.step_records` and the outputs of the same generate() call (failed requests left out)."""
        done = [out for out in outputs if out.error is None]
        return cls(batch_size=len(done),
                   input_seq_len=max((out.prompt_token_count for out in done), default=0),
                   output_seq_len=max((len(out.token_ids) for out in done), default=0),
                   prefill_seconds=[r.seconds for r in step_records if r.is_prefill],
                   decode_seconds=[r.seconds for r in step_records if not r.is_prefill],
                   output_tokens=sum(len(out.token_ids) for out in done),
                   cached_prompt_tokens=sum(out.cached_prompt_tokens for out in done),
                   cached_visual_items=sum(out.cached_visual_items for out in done))

    @property
    def prefill_time_ms(self) -> float:
        return 1000 * sum(self.prefill_seconds)

    @property
    def decode_token_time_ms(self) -> float:
        if not self.decode_seconds:
            return 0.0
        return 1000 * sum(self.decode_seconds) / len(self.decode_seconds)

    @property
    def e2e_time_ms(self) -> float:
        return self.prefill_time_ms + 1000 * sum(self.decode_seconds)

    @property
    def prefill_average_time_ms(self) -> float:
        return self.prefill_time_ms / self.batch_size if self.batch_size else 0.0

    @property
    def throughput(self) -> float:
        """Generated tokens per second of e2e time."""
        return 1000 * self.output_tokens / self.e2e_time_ms if self.e2e_time_ms else 0.0

    def log_line(self) -> str:
        return (f"Prefill time: {self.prefill_time_ms:.2f}ms, Prefill average time: "
                f"{self.prefill_average_time_ms:.2f}ms, Decode token time: {self.decode_token_time_ms:.2f}ms, "
                f"E2E time: {self.e2e_time_ms:.2f}ms")

    def csv_row(self) -> list:
        return [self.batch_size, self.input_seq_len, self.output_seq_len, f"{self.e2e_time_ms:.2f}",
                f"{self.prefill_time_ms:.2f}", f"{self.decode_token_time_ms:.2f}", len(self.prefill_seconds),
                ",".join(f"{s:.6f}" for s in self.prefill_seconds), ",".join(f"{s:.6f}" for s in self.decode_seconds),
                f"{self.prefill_average_time_ms:.2f}", self.cached_prompt_tokens, self.cached_visual_items]


def prepare_folder(path: str, make: bool = True) -> None:
    """Check a CSV can be written at `path`: a folder that can be written (made, mode 0750 as MindIE's, where
    `make`; before the run it is only checked, so that a run that fails leaves no empty folder), and nothing at the
    path but an earlier benchmark CSV (a link to nothing is refused, not followed). A UserError if not."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"{PATH_VARIABLE} {path} is a link to nothing; it is left untouched")
    folder = os.path.dirname(os.path.abspath(path))
    if not make:
        problem = folder_problem(folder)
        if problem is not None:
            raise UserError(f"{PATH_VARIABLE} {path}: cannot write a file there ({problem})")
    else:
        try:
            os.makedirs(folder, mode=0o750, exist_ok=True)
        except OSError as e:
            raise UserError(f"{PATH_VARIABLE} {path}: cannot create {folder}: {e.strerror}") from None
    if (os.path.isdir(folder) and not os.access(folder, os.W_OK)) or os.path.isdir(path):
        raise UserError(f"{PATH_VARIABLE} {path}: cannot write a file there")
    if os.path.exists(path) and not is_benchmark_csv(path):
        raise UserError(f"{PATH_VARIABLE} {path} exists and is not a benchmark CSV the kit wrote; it is left "
                        "untouched: give another path, or remove it")


def is_benchmark_csv(path: str) -> bool:
    """Whether the file starts with the benchmark CSV's header (MindIE's ten columns, the kit's two after)."""
    return first_line(path).startswith(",".join(COLUMNS[:10]))


def write_csv(path: str, summaries: list[RunSummary]) -> None:
    """The header and one row per summary, replacing an earlier benchmark CSV atomically (mode 0640, as MindIE)."""
    prepare_folder(path)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(COLUMNS)
    writer.writerows(summary.csv_row() for summary in summaries)
    replace_file(path, text.getvalue().encode("utf-8"), recognised(is_benchmark_csv, PATH_VARIABLE), PATH_VARIABLE)


TABLE_COLUMNS = ("batch", "input len", "output len", "first token (ms)", "per token (ms)", "e2e (ms)",
                 "throughput (tokens/s)")


def markdown_table(summaries: list[RunSummary]) -> str:
    """The figures users compare, one row per run: first-token time, non-first-token time, e2e, throughput."""
    rows = [TABLE_COLUMNS, ("---",) * len(TABLE_COLUMNS)]
    for s in summaries:
        rows.append((str(s.batch_size), str(s.input_seq_len), str(s.output_seq_len), f"{s.prefill_time_ms:.2f}",
                     f"{s.decode_token_time_ms:.2f}", f"{s.e2e_time_ms:.2f}", f"{s.throughput:.2f}"))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
