"""One run_pa run, from the flags `atb_models.cli.run_pa` parsed: everything the user gave checked before the model
loads, the engine built, the untimed warm-up, the requests (or the --performance sweep), then MindIE's report."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time

from atb_models import distributed
from atb_models.benchmark.csv_report import benchmark_enabled
from atb_models.benchmark.timed_runs import check_csv_path, performance_sweep, record_run, warm_up
from atb_models.cli.entry import configure_logging, error_line, ignore_further_stops, one_line, print_error
from atb_models.cli.inputs import Entry, check_results_path, dataset_entries, single_prompt
from atb_models.cli.results import print_report, save_finished_results, save_results
from atb_models.cli.run_pa import DEFAULT_BATCH_SIZES, DEFAULT_INPUT_TEXT, Family, engine_options
from atb_models.engine.llm import LLM, RequestOutput
from atb_models.engine.sampling_params import SamplingParams
from atb_models.errors import UserError
from atb_models.multimodal.media import classify_media

logger = logging.getLogger("atb_models.run_pa")


def run(args: argparse.Namespace, family: Family) -> int:
    ranks = distributed.env_state()
    configure_logging(ranks.rank)
    if args.cleanup_shm:
        return cleanup_shm(args.shm_name_save_path)
    if (args.batch_sizes or args.output_lengths) and not args.performance:
        raise UserError("--batch_sizes and --output_lengths go with --performance")
    if args.performance and args.dataset_path is not None:
        raise UserError("--performance runs copies of one prompt: give --input_image, not --dataset_path")
    model_path, text, paths = args.model_path, args.input_text, args.input_image
    if model_path is None:
        from atb_models.demo.reader import READER_MODEL_DIR, reader_samples

        model_path = str(READER_MODEL_DIR)
        if ranks.rank == 0:
            print(f"Note: no --model_path given, so the kit's demo reader in {model_path} is used: a tiny Qwen2-VL "
                  "trained only to read a word or number and name colours (see its README.md). Pass --model_path "
                  f"/path/to/{family.example_checkpoint} for a real model.", file=sys.stderr, flush=True)
        samples = reader_samples()
        if not paths and args.dataset_path is None:
            paths = [str(samples["image"].path)]
        if text is None:  # the question of the first medium's kind: read a sign, how a clip ends
            text = samples[classify_media(paths[0]) if paths else "image"].question
    text = DEFAULT_INPUT_TEXT if text is None else text

    dataset_mode = args.dataset_path is not None
    batch_sizes = (args.batch_sizes or DEFAULT_BATCH_SIZES) if args.performance else [args.max_batch_size]
    output_lengths = args.output_lengths or [args.max_output_length]
    # Everything the user gave is checked before the model loads: a bad flag or file is news in seconds, not after
    # loading and warming up.
    params = sampling_params(args)
    check_csv_path(args.performance, ranks.rank)
    if dataset_mode:
        # Rank 0 writes the results; on a node of its own, another rank's folder need not hold the path.
        results_path = check_results_path(args.results_save_path) if ranks.rank == 0 else None
        entries = dataset_entries(args.dataset_path, text)
    else:
        if not paths:
            raise UserError("give --input_image or --dataset_path")
        prompt = single_prompt(paths, text)

    overrides = dict(max_batch_size=max(batch_sizes), max_output_length=max(output_lengths))
    if not dataset_mode and (args.performance or benchmark_enabled()) and args.enable_prefix_caching:
        # Timed copies of one prompt would share one prefill through the prefix cache: MindIE's figures time each.
        logger.info("prefix caching off for the timed copies of one prompt (each one's prefill is timed, as MindIE "
                    "times it)")
        overrides["enable_prefix_caching"] = False
    llm = LLM(model_path, **engine_options(args, **overrides))
    if not dataset_mode:
        # The copies of one batch, made once memory has capped it (logged): never one per slot of a huge
        # --max_batch_size. --performance makes its own per point.
        entries = [Entry(list(prompt)) for _ in range(1 if args.performance else llm.max_batch_size)]
    warm_up(llm)
    if args.performance:
        performance_sweep(llm, entries[0].items, params, batch_sizes, output_lengths, ranks.rank)
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
        outputs = llm.generate([entry.items for entry in runnable], params, on_finish=record) if runnable else []
    except KeyboardInterrupt:
        ignore_further_stops()
        if dataset_mode and ranks.rank == 0:
            try:
                save_finished_results(entries, results_path, args.results_save_path)
            except UserError as e:  # said, and the run still ends as the signal asked
                print_error(error_line(e))
        raise
    latency = time.perf_counter() - start

    failed = [entry for entry in entries if entry.error is not None]
    if not dataset_mode and failed:
        # The copies are one prompt: the first failure says why, once.
        raise UserError(failed[0].error)
    record_run(llm, outputs, ranks.rank)
    if ranks.rank == 0:
        print_report(entries, latency)
        if dataset_mode:
            save_results(entries, results_path, args.results_save_path)
    return 1 if failed else 0


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The run's SamplingParams, made before the model loads so that a bad value is refused at once. max_tokens
    is left to the engine's --max_output_length (--performance sets it per point)."""
    for flag in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(args, flag)
        if not math.isfinite(value):
            raise UserError(f"--{flag} must be a finite number, got {value}")
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, ignore_eos=args.ignore_eos)


def cleanup_shm(name_file: str) -> int:
    """The segments listed at the path and at its siblings PATH.node<N> (the lists of a job's other nodes, where
    the path lies on a filesystem they share)."""
    import glob

    from atb_models.multimodal.shm import remove_stale_segments

    for path in [name_file] + sorted(glob.glob(f"{glob.escape(name_file)}.node[0-9]*")):
        removed = remove_stale_segments(path)
        print(f"removed {len(removed)} shared-memory segment(s) listed in {one_line(path)}")
    return 0
