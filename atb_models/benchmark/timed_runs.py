"""The benchmark's part of a run_pa run: the untimed warm-up, the benchmark CSV of the timed run
(ATB_LLM_BENCHMARK_ENABLE=1), and the --performance sweep over batch sizes and output lengths.

run_pa calls these in this order: `check_csv_path` with the other flags, before the model loads; `warm_up` once the
engine exists; then `performance_sweep` in place of the run, or `record_run` after it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from atb_models.benchmark.csv_report import (PATH_VARIABLE, RunSummary, benchmark_enabled, benchmark_path,
                                             markdown_table, prepare_folder, write_csv)
from atb_models.engine.sampling_params import SamplingParams
from atb_models.errors import UserError

if TYPE_CHECKING:  # the engine (torch) is not imported for check_csv_path, which runs before the model loads
    from atb_models.engine.llm import LLM, RequestOutput

logger = logging.getLogger("atb_models.benchmark")


def check_csv_path(performance: bool, rank: int) -> None:
    """Where the CSV will be written, refused now rather than after the run (rank 0 alone writes it)."""
    if (performance or benchmark_enabled()) and rank == 0:
        prepare_folder(benchmark_path(), make=False)


def warm_up(llm: LLM) -> None:
    """One short request before anything is timed, as MindIE runs one: a white 224x224 image (64 visual tokens) and
    two output tokens, so one-off costs (first allocations, thread pools, lazy initialisation) stay out of the
    figures. It never writes the benchmark CSV; a limit it breaks (a tiny --max_input_length) only skips it."""
    from PIL import Image

    start = time.perf_counter()
    request = [{"image": Image.new("RGB", (224, 224), "white")}, {"text": "Describe the image."}]
    [output] = llm.generate([request], SamplingParams(max_tokens=min(2, llm.max_output_length), ignore_eos=True))
    if output.error is not None:
        # Its own small prompt, not the user's: the run's requests are checked, and reported, on their own.
        logger.info("warm-up skipped: its 224x224 test image does not fit the engine's limits")
        logger.debug("warm-up: %s", output.error)
    else:
        logger.info("warm-up: 1 request in %.2f s", time.perf_counter() - start)


def record_run(llm: LLM, outputs: list[RequestOutput], rank: int) -> None:
    """With ATB_LLM_BENCHMARK_ENABLE=1, the step timings of the generate() call that gave `outputs`, unless every
    request failed (then no step ran worth a row)."""
    if benchmark_enabled() and any(output.error is None for output in outputs):
        dump_benchmark([RunSummary.from_run(llm.step_records, outputs)], rank)


def dump_benchmark(summaries: list[RunSummary], rank: int, label: str = "") -> None:
    """MindIE's log line for the latest run; rank 0 alone writes every run's row to the benchmark CSV."""
    logger.info("%s%s", label, summaries[-1].log_line())
    if rank != 0:
        return
    path = benchmark_path()
    try:
        write_csv(path, summaries)
    except OSError as e:
        raise UserError(f"{PATH_VARIABLE} {path}: cannot write: {e.strerror}") from None
    logger.info("benchmark of %d run(s) written to %s", len(summaries), path)


def performance_sweep(llm: LLM, items: list, params: SamplingParams, batch_sizes: list[int],
                      output_lengths: list[int], rank: int) -> None:
    """Every (output length, batch size) point on copies of one prompt, eos ignored so outputs reach the length;
    a table of them on stdout (rank 0). The CSV is rewritten after each point, so a sweep cut short keeps the rows
    it finished. Batch sizes beyond the batch the engine's memory allows (llm.max_batch_size, capped) are left out,
    with a warning: they would measure queueing, not a batch."""
    runnable = [size for size in batch_sizes if size <= llm.max_batch_size]
    if len(runnable) < len(batch_sizes):
        logger.warning("--batch_sizes %s left out: the engine's batch is capped at %d by memory",
                       ",".join(str(size) for size in batch_sizes if size > llm.max_batch_size), llm.max_batch_size)
    if not runnable:
        raise UserError(f"no --batch_sizes value fits the engine's batch of {llm.max_batch_size} (capped by memory)")
    summaries = []
    for output_length in output_lengths:
        point = dataclasses.replace(params, max_tokens=output_length, ignore_eos=True)
        for batch_size in runnable:
            outputs = llm.generate([list(items) for _ in range(batch_size)], point)
            failed = [output.error for output in outputs if output.error is not None]
            if failed:
                raise UserError(failed[0])
            summaries.append(RunSummary.from_run(llm.step_records, outputs))
            dump_benchmark(summaries, rank, f"batch size {batch_size}, output length {output_length}: ")
    if rank == 0:
        print(markdown_table(summaries), flush=True)
