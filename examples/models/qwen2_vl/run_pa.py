"""Qwen2-VL from the command line, with MindIE's flags and console lines.

    python -m examples.models.qwen2_vl.run_pa --model_path DIR --input_image cat.jpg [--input_image clip.mp4 ...]
    python -m examples.models.qwen2_vl.run_pa --model_path DIR --dataset_path FOLDER

Single mode runs --max_batch_size copies of one prompt (its media in the order given, then --input_text); dataset mode
runs one prompt per file of a folder and writes {file name: answer} to --results_save_path; an entry of the folder
that fails is recorded as {"error": why}, a hidden file or a sub-folder as {"skipped": why}. Without --model_path the kit's bundled demo reader (a tiny
Qwen2-VL trained to read words and numbers and name colours) answers, by default the question its sample picture
goes with. Bad input is one `Error: ...` line on stderr and exit status 1, found before the model loads where it
can be (flags, the media files, the results path); --debug shows the traceback instead. Ctrl-C exits 130 and SIGTERM
143, in dataset mode after writing the answers finished so far.

A short warm-up request runs first and is never timed. With ATB_LLM_BENCHMARK_ENABLE=1 the run's step timings go to
the benchmark CSV (atb_models/benchmark/csv_report.py); --performance sweeps batch sizes and output lengths on
copies of the single-mode prompt, one CSV row each, and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from atb_models import LLM, RequestOutput, SamplingParams, UserError, distributed
from atb_models.benchmark.csv_report import (PATH_VARIABLE, RunSummary, benchmark_enabled, benchmark_path,
                                             markdown_table, prepare_folder, write_csv)
from atb_models.launch import launched, report_exit_status, report_rank_failure, stop_line
from atb_models.multimodal.media import classify_media, probe_media_file
from atb_models.multimodal.prompt import describe_request
from atb_models.platform import DEVICE_CHOICES, DTYPE_CHOICES

logger = logging.getLogger("atb_models.run_pa")

DEFAULT_BATCH_SIZES = [1, 2, 4, 8, 16]  # --performance
DEFAULT_INPUT_TEXT = "Describe the image."
# MindIE prints questions with \n \r \t \f \v \b and DEL replaced by spaces; other C0 controls go the same way.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_pa", description="Qwen2-VL inference with paged attention (single prompt or a folder of media).")
    parser.add_argument("--model_path", metavar="DIR",
                        help="Qwen2-VL checkpoint folder; absent: the kit's demo reader (atb_models/demo/"
                             "reader_model), a tiny Qwen2-VL trained to read a word or number and name colours")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--input_image", action="append", metavar="PATH",
                       help="an image (.jpg .jpeg .png .bmp) or video (.mp4 .wmv .avi) for the prompt; repeat it for "
                            "several media in one prompt, in order")
    media.add_argument("--dataset_path", metavar="DIR",
                       help="a folder of images and videos: one prompt per file, in file-name order")
    parser.add_argument("--input_text", metavar="TEXT",
                        help=f"the text after the media (default {DEFAULT_INPUT_TEXT!r}; the demo reader's: the "
                             "question its sample goes with; run_pa.sh asks real models for a long answer)")
    parser.add_argument("--max_batch_size", type=int, metavar="N", default=1,
                        help="requests running at once; single mode runs this many copies of the prompt")
    parser.add_argument("--max_input_length", type=int, metavar="N", default=4096,
                        help="prompt tokens, visual tokens included")
    parser.add_argument("--max_output_length", type=int, metavar="N", default=256, help="generated tokens per request")
    parser.add_argument("--max_prefill_tokens", type=int, metavar="N", default=-1,
                        help="prompt tokens per prefill step; -1: max_batch_size * (input + output length)")
    parser.add_argument("--block_size", type=int, metavar="N", default=128, help="tokens per KV-cache block")
    parser.add_argument("--shm_name_save_path", metavar="PATH", default="./shm_name.txt",
                        help="file listing the shared-memory segments through which ranks share media (world "
                             "size above 1); runs given the same path share it under a lock; a file at the path "
                             "that the kit did not write is refused and left untouched")
    parser.add_argument("--cleanup_shm", action="store_true",
                        help="remove the shared-memory segments killed earlier runs left (listed in "
                             "--shm_name_save_path and its PATH.node<N> siblings), then exit")
    parser.add_argument("--results_save_path", metavar="PATH", default="./results.json",
                        help="dataset mode: where {file name: answer} is written")
    sampling = parser.add_argument_group("sampling (greedy by default)")
    sampling.add_argument("--temperature", type=float, metavar="X", default=0.0, help="0: greedy")
    sampling.add_argument("--top_k", type=int, metavar="N", default=0, help="0: no top-k cut")
    sampling.add_argument("--top_p", type=float, metavar="X", default=1.0, help="1.0: no nucleus cut")
    sampling.add_argument("--repetition_penalty", type=float, metavar="X", default=1.0, help="1.0: none")
    sampling.add_argument("--seed", type=int, metavar="N", help="makes sampling reproducible")
    sampling.add_argument("--ignore_eos", action="store_true", help="generate --max_output_length tokens every time")
    kit = parser.add_argument_group("device and preprocessing")
    kit.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                     help="auto: config.json's torch_dtype, or a dtype this device runs fast (logged)")
    kit.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: npu, then cuda, then cpu")
    kit.add_argument("--min_pixels", type=int, metavar="N", help="image pixel floor (default: the checkpoint's)")
    kit.add_argument("--max_pixels", type=int, metavar="N", help="image pixel ceiling (default: the checkpoint's)")
    kit.add_argument("--video_fps", type=float, metavar="X", default=0.5, help="video frames sampled per second")
    kit.add_argument("--video_max_frames", type=int, metavar="N", default=768, help="most frames taken from one video")
    benchmark = parser.add_argument_group(
        "benchmark", "ATB_LLM_BENCHMARK_ENABLE=1 writes a run's step timings to ATB_LLM_BENCHMARK_FILEPATH "
                     "(default ./benchmark_result/benchmark.csv); the warm-up request never does")
    benchmark.add_argument("--performance", action="store_true",
                           help="sweep --batch_sizes x --output_lengths on copies of the single-mode prompt, eos "
                                "ignored: one benchmark CSV row per point (whatever ATB_LLM_BENCHMARK_ENABLE says) "
                                "and a table on stdout instead of the answers")
    benchmark.add_argument("--batch_sizes", type=positive_int_list, metavar="LIST",
                           help="with --performance: comma-separated batch sizes (default 1,2,4,8,16); the engine is "
                                "sized for the largest, in place of --max_batch_size")
    benchmark.add_argument("--output_lengths", type=positive_int_list, metavar="LIST",
                           help="with --performance: comma-separated output lengths (default --max_output_length); "
                                "the engine is sized for the longest, in place of --max_output_length")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    return parser


def positive_int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


# ----------------------------------------------------------------------------------------------------- set-up

def configure_logging(rank: int) -> None:
    """The kit's log lines on stderr; only rank 0 speaks below WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] %(message)s", "%H:%M:%S"))
    kit_logger = logging.getLogger("atb_models")
    kit_logger.handlers[:] = [handler]
    kit_logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    kit_logger.propagate = False


# ------------------------------------------------------------------------------------------------------ inputs

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


def one_line(text: str) -> str:
    return _CONTROL_CHARS.sub(" ", text)


def question(items: list) -> str:
    """The request as the Question[i] line shows it: media as <kind: path>, then the text."""
    return one_line(describe_request(items))


# --------------------------------------------------------------------------------------------------------- run

def cleanup_shm(name_file: str) -> int:
    """The segments listed at the path and at its siblings PATH.node<N> (the lists of a job's other nodes, where
    the path lies on a filesystem they share)."""
    import glob

    from atb_models.multimodal.shm import remove_stale_segments

    for path in [name_file] + sorted(glob.glob(f"{glob.escape(name_file)}.node[0-9]*")):
        removed = remove_stale_segments(path)
        print(f"removed {len(removed)} shared-memory segment(s) listed in {path}")
    return 0


def run(args: argparse.Namespace) -> int:
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
                  "/path/to/Qwen2-VL-7B-Instruct for a real model.", file=sys.stderr, flush=True)
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
    if (args.performance or benchmark_enabled()) and ranks.rank == 0:
        prepare_folder(benchmark_path())  # a path that cannot be written fails now, not after the run
    if dataset_mode:
        # Rank 0 writes the results; on a node of its own, another rank's folder need not hold the path.
        results_path = check_results_path(args.results_save_path) if ranks.rank == 0 else None
        entries = dataset_entries(args.dataset_path, text)
    else:
        if not paths:
            raise UserError("give --input_image or --dataset_path")
        entries = single_entries(paths, text, 1 if args.performance else args.max_batch_size)

    llm = LLM(model_path, dtype=args.dtype, device=args.device, max_batch_size=max(batch_sizes),
              max_input_length=args.max_input_length, max_output_length=max(output_lengths),
              block_size=args.block_size, max_prefill_tokens=args.max_prefill_tokens, min_pixels=args.min_pixels,
              max_pixels=args.max_pixels, video_fps=args.video_fps, video_max_frames=args.video_max_frames,
              shm_name_save_path=args.shm_name_save_path)
    if not dataset_mode:
        entries = entries[:llm.max_batch_size]  # the copies of one batch, after memory capped it (logged)
    warm_up(llm)
    if args.performance:
        return run_performance(llm, entries[0].items, params, batch_sizes, output_lengths, ranks.rank)

    runnable = [entry for entry in entries if entry.error is None and entry.skipped is None]
    finished = []

    def record(output: RequestOutput) -> None:  # as each request ends, so that an interrupted run keeps it
        entry = runnable[output.request_id]
        entry.output, entry.error = output, output.error
        finished.append(entry)
        if dataset_mode:
            logger.info("%s: %s (%d of %d)", entry.name, "failed" if output.error else "answered", len(finished),
                        len(runnable))

    start = time.perf_counter()
    try:
        outputs = llm.generate([entry.items for entry in runnable], params, on_finish=record) if runnable else []
    except KeyboardInterrupt:
        ignore_further_stops()
        if dataset_mode and ranks.rank == 0:
            try:
                save_finished_results(entries, results_path, args.results_save_path)
            except UserError as e:  # said, and the run still ends as the signal asked
                print(f"Error: {one_line(str(e))}", file=sys.stderr, flush=True)
        raise
    latency = time.perf_counter() - start

    failed = [entry for entry in entries if entry.error is not None]
    if not dataset_mode and failed:
        # The copies are one prompt: the first failure says why, once.
        raise UserError(failed[0].error)
    if benchmark_enabled() and any(output.error is None for output in outputs):
        dump_benchmark([RunSummary.from_run(llm.step_records, outputs)], ranks.rank)
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


def run_performance(llm: LLM, items: list, params: SamplingParams, batch_sizes: list[int],
                    output_lengths: list[int], rank: int) -> int:
    """Every (output length, batch size) point on copies of one prompt, eos ignored so outputs reach the length.
    The CSV is rewritten after each point, so a sweep cut short keeps the rows it finished."""
    summaries = []
    for output_length in output_lengths:
        point = dataclasses.replace(params, max_tokens=output_length, ignore_eos=True)
        for batch_size in batch_sizes:
            outputs = llm.generate([list(items) for _ in range(batch_size)], point)
            failed = [output.error for output in outputs if output.error is not None]
            if failed:
                raise UserError(failed[0])
            summaries.append(RunSummary.from_run(llm.step_records, outputs))
            dump_benchmark(summaries, rank, f"batch size {batch_size}, output length {output_length}: ")
    if rank == 0:
        print(markdown_table(summaries), flush=True)
    return 0


def print_report(entries: list[Entry], latency: float) -> None:
    """MindIE's console lines; a failed dataset entry gets an `Error: name: why` line on stderr in its place, and a
    skipped one a `Skipped: name: why` line instead of a question."""
    total_tokens = 0
    for entry in entries:
        if entry.skipped is not None:
            print(f"Skipped: {entry.name}: {entry.skipped}", file=sys.stderr, flush=True)
    for i, entry in enumerate(entry for entry in entries if entry.skipped is None):
        print(f"Question[{i}]: {question(entry.items)}", flush=True)
        if entry.error is not None:
            print(f"Error: {entry.name}: {one_line(entry.error)}", file=sys.stderr, flush=True)
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
                len(results) - failed - skipped, failed, skipped, shown_path)


def save_finished_results(entries: list[Entry], path: str, shown_path: str) -> None:
    """On Ctrl-C or SIGTERM: the entries finished so far, so a long run cut short keeps its answers."""
    results = results_of(entries)
    answers = sum(not isinstance(result, dict) for result in results.values())
    if not results:
        print(f"no answer was finished; {shown_path} is left as it was", file=sys.stderr, flush=True)
        return
    write_results(results, path, shown_path)
    failures = sum(entry.error is not None for entry in entries)
    print(f"wrote {answers} of {len(entries)} answers to {shown_path} before stopping"
          + (f" (and {failures} failed entries)" if failures else ""), file=sys.stderr, flush=True)


def write_results(results: dict, path: str, shown_path: str) -> None:
    """Atomically: a temporary file in the same folder, synced, then renamed over `path`, so that a full disk or
    an interruption leaves the previous results file whole, and no temporary file behind."""
    text = json.dumps(results, sort_keys=True, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not valid UTF-8: \u escapes keep the JSON valid
        data = json.dumps(results, sort_keys=True).encode("ascii")
    existed = os.path.isfile(path)
    temp = None
    try:
        fd, temp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, stat.S_IMODE(os.stat(path).st_mode) if existed else 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException as e:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        if not isinstance(e, OSError):
            raise
        kept = "the previous results file is left as it was" if existed else "nothing was written"
        raise UserError(f"--results_save_path {shown_path}: cannot write: {e.strerror or e}; {kept}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised wherever the program was, so that it ends as on Ctrl-C (the answers finished so far written,
    shared memory removed) but says so and exits with 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals():
    """SIGTERM raises Stopped while main runs. Installed before the engine exists: shm.install_cleanup replaces
    only a default SIGTERM handler (the segments are still removed at exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def ignore_further_stops() -> None:
    """Once stopping, a second Ctrl-C or SIGTERM must not cut short the writing of what was finished."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with stop_signals():
        try:
            # Under atb_models.launch a rank's failed entries are reported to the launcher, which exits with it.
            return report_exit_status(run(args))
        except (UserError, distributed.RankLost) as e:
            if args.debug:
                raise
            try:
                reported = report_rank_failure(one_line(str(e)))
            except KeyboardInterrupt:  # the launcher stopped this rank while it lingered; its cause is recorded
                return 1
            if not reported:
                print(f"Error: {one_line(str(e))}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            ignore_further_stops()
            signum = getattr(e, "signum", signal.SIGINT)
            if not launched():  # the launcher says it once for every rank
                print(stop_line(signum), file=sys.stderr, flush=True)
            return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
