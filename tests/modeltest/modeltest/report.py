"""Where a run's files go and what they hold.

    <output_dir>/<date>/modeltest/<model_name>/precision_result/
        results/<DEVICE>/precision_test/<task>/<dtype>/<model_name>/
            <task>_<backend>_batch<N>_tp<W>_result.csv    the metric table: Tasks,Total,Failed,Pass,Metric,Value
            <task>_<backend>_batch<N>_tp<W>_result.txt    the run's settings and the table, for people
        debug/<DEVICE>/precision_test/<task>/<dtype>/<model_name>/
            outputs_<time>.txt                             a line per sample: [answer] TAB [model input] TAB seconds
            <task>_<backend>_batch<N>_tp<W>_debug_<time>.jsonl   a record per sample (see SampleResult)

<dtype> is what the language model computes in (bf16, fp16, fp32), <DEVICE> NPU, GPU or CPU.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
from tabulate import tabulate

from atb_models import UserError
from atb_models.outputs import first_line, folder_problem, recognised, replace_file

from modeltest.evaluate import MetricRow, SampleResult

DEVICE_LABELS = {"npu": "NPU", "cuda": "GPU", "cpu": "CPU"}
DTYPE_LABELS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CSV_COLUMNS = ("Tasks", "Total", "Failed", "Pass", "Metric", "Value")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def check_output_dir(output_dir: str) -> None:
    """Fail before the model loads, not after the run, when nothing can be written. Nothing is made here (the run
    makes its folders when it starts writing), so a run that fails before leaves no empty folder behind."""
    problem = folder_problem(output_dir)
    if problem is not None:
        raise UserError(f"--output_dir {output_dir}: cannot create it: {problem}")
    existing = Path(output_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    probe = existing / f".modeltest-write-check-{datetime.now():%H%M%S%f}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output_dir {output_dir}: not writable: {e.strerror}") from None


@dataclass(frozen=True)
class OutputLayout:
    results_dir: Path
    debug_dir: Path
    stem: str                   # <task>_<backend>_batch<N>_tp<W>
    stamp: str                  # the run's start time, in debug file names

    @classmethod
    def for_run(cls, output_dir: str, started: datetime, model_name: str, task_name: str, plan, backend: str,
                batch_size: int, world_size: int) -> "OutputLayout":
        precision = Path(output_dir) / f"{started:%Y-%m-%d}" / "modeltest" / model_name / "precision_result"
        sub = Path(DEVICE_LABELS[plan.kind], "precision_test", task_name, DTYPE_LABELS[plan.llm_dtype], model_name)
        layout = cls(precision / "results" / sub, precision / "debug" / sub,
                     f"{task_name}_{backend}_batch{batch_size}_tp{world_size}", f"{started:%Y-%m-%d_%H-%M-%S.%f}")
        for folder in (layout.results_dir, layout.debug_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create {folder}: {e.strerror}") from None
        return layout

    @property
    def result_csv(self) -> Path:
        return self.results_dir / f"{self.stem}_result.csv"

    @property
    def result_report(self) -> Path:
        return self.results_dir / f"{self.stem}_result.txt"

    @property
    def outputs_txt(self) -> Path:
        return self.debug_dir / f"outputs_{self.stamp}.txt"

    @property
    def samples_jsonl(self) -> Path:
        return self.debug_dir / f"{self.stem}_debug_{self.stamp}.jsonl"


def _outputs_line(result: SampleResult) -> str:
    """MindIE's outputs_*.txt line for one sample, with tabs between its fields (repr() escapes any in them)."""
    fields = [str([result.answer]), str([result.request]), f"{result.seconds:.4f}"]
    if result.error is not None:
        fields.append("error: " + _CONTROL_CHARS.sub(" ", result.error))
    return "\t".join(fields)


def append_debug(layout: OutputLayout, results: list[SampleResult]) -> None:
    """Written after each subset, so an interrupted run keeps the records it made. (Text UTF-8 cannot hold, a lone
    surrogate of a question, is written as its \\u escape: in the JSON lines, the escape JSON reads back.)"""
    with open(layout.outputs_txt, "a", encoding="utf-8", errors="backslashreplace") as f:
        f.writelines(_outputs_line(result) + "\n" for result in results)
    with open(layout.samples_jsonl, "a", encoding="utf-8", errors="backslashreplace") as f:
        f.writelines(json.dumps(asdict(result), ensure_ascii=False, default=str) + "\n" for result in results)


def _number(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


def write_result_csv(path: Path, rows: list[MetricRow]) -> None:
    """Atomically, over nothing but an earlier result CSV (outputs.replace_file)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([row.tasks, row.total, row.failed, round(row.passed, 6), row.metric, round(row.value, 6)])
    replace_file(str(path), text.getvalue().encode("utf-8"),
                 recognised(lambda p: first_line(p) == ",".join(CSV_COLUMNS), "result file"), "result file")


def metric_table(rows: list[MetricRow], metrics: dict) -> str:
    """The metrics side by side, a line per task or subset."""
    headers = ["Tasks", "Total", "Failed"] + [part for metric in metrics for part in (f"{metric} pass", metric)]
    lines = []
    for first in range(0, len(rows), len(metrics)):  # metric_rows gives each group's metrics together
        group = rows[first:first + len(metrics)]
        lines.append([group[0].tasks, group[0].total, group[0].failed]
                     + [part for row in group for part in (_number(row.passed), f"{row.value:.4f}")])
    return tabulate(lines, headers=headers, tablefmt="grid", disable_numparse=True)


def write_result_report(path: Path, settings: dict, rows: list[MetricRow], metrics: dict) -> None:
    meanings = "\n".join(f"  {metric}: {meaning}" for metric, meaning in metrics.items())
    text = (f"run:\n{tabulate(list(settings.items()), tablefmt='grid', disable_numparse=True)}\n\n"
            f"metric table:\n{metric_table(rows, metrics)}\n"
            f"Value = pass / Total; a failed sample counts as wrong.\n{meanings}\n")
    replace_file(str(path), text.encode("utf-8", "backslashreplace"),
                 recognised(lambda p: first_line(p) == "run:", "result file"), "result file")
