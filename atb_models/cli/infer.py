"""One run_pa run, once `atb_models.cli.prepare` has checked the flags and files (its RunPlan): the engine built,
the untimed warm-up, the requests (or the --performance sweep), then MindIE's report."""

from __future__ import annotations

import argparse
import logging
import time

from atb_models.benchmark.csv_report import benchmark_enabled
from atb_models.benchmark.timed_runs import performance_sweep, record_run, warm_up
from atb_models.cli.entry import error_line, ignore_further_stops, one_line, print_error
from atb_models.cli.inputs import Entry
from atb_models.cli.prepare import RunPlan
from atb_models.cli.results import print_report, save_finished_results, save_results
from atb_models.cli.run_pa import engine_options
from atb_models.engine.llm import LLM, RequestOutput
from atb_models.errors import RankLost, UserError

logger = logging.getLogger("atb_models.run_pa")


def run(args: argparse.Namespace, plan: RunPlan) -> int:
    dataset_mode = plan.dataset_mode
    # (a beam search's requests run beam_width rows each: the batch, and the KV cache sized by it, hold them all)
    overrides = dict(max_batch_size=max(plan.batch_sizes) * (plan.beams.beam_width if plan.beams else 1),
                     max_output_length=max(plan.output_lengths))
    if not dataset_mode and (args.performance or benchmark_enabled()) and args.enable_prefix_caching:
        # Timed copies of one prompt would share one prefill through the prefix cache: MindIE's figures time each.
        logger.info("prefix caching off for the timed copies of one prompt (each one's prefill is timed, as MindIE "
                    "times it)")
        overrides["enable_prefix_caching"] = False
    llm = LLM(plan.model_path, **engine_options(args, **overrides))
    if dataset_mode:
        entries = plan.entries
    else:
        # The copies of one batch, made once memory has capped it (logged): never one per slot of a huge
        # --max_batch_size. --performance makes its own per point.
        copies = 1 if args.performance else max(1, llm.max_batch_size // (plan.beams.beam_width if plan.beams else 1))
        entries = [Entry(list(plan.prompt)) for _ in range(copies)]
    warm_up(llm)
    if args.performance:
        performance_sweep(llm, entries[0].items, plan.params, plan.batch_sizes, plan.output_lengths, plan.rank)
        return 0

    runnable = [entry for entry in entries if entry.error is None and entry.skipped is None]
    finished: list[Entry] = []

    def record(output: RequestOutput) -> None:  # as each request ends, so that an interrupted run keeps it
        entry = runnable[output.request_id]
        entry.output, entry.error = output, output.error
        finished.append(entry)
        if dataset_mode:
            logger.info("%s: %s (%d of %d)", one_line(entry.name), "failed" if output.error else "answered",
                        len(finished), len(runnable))

    start = time.perf_counter()
    try:
        requests = [entry.items for entry in runnable]
        if not requests:
            outputs = []
        elif plan.beams is not None:
            outputs = llm.beam_search(requests, plan.beams, on_finish=record)
        else:
            outputs = llm.generate(requests, plan.params, on_finish=record)
    except (KeyboardInterrupt, RankLost):  # a signal, or a peer rank gone: keep what is finished either way
        ignore_further_stops()
        if dataset_mode and plan.rank == 0:
            try:
                save_finished_results(entries, plan.results_path, args.results_save_path)
            except UserError as e:  # said, and the run still ends as the signal asked
                print_error(error_line(e))
        raise
    latency = time.perf_counter() - start

    failed = [entry for entry in entries if entry.error is not None]
    if not dataset_mode and failed:
        # The copies are one prompt: the first failure says why, once.
        raise UserError(failed[0].error)
    record_run(llm, outputs, plan.rank)
    if plan.rank == 0:
        print_report(entries, latency)
        if dataset_mode:
            save_results(entries, plan.results_path, args.results_save_path)
    return 1 if failed else 0
