"""run_pa, a model family's command line with MindIE's flags and console lines: its flags and `main`.

    python -m examples.models.qwen2_vl.run_pa --model_path DIR --input_image cat.jpg [--input_image clip.mp4 ...]
    python -m examples.models.qwen2_vl.run_pa --model_path DIR --dataset_path FOLDER

Single mode runs --max_batch_size copies of one prompt (its media in the order given, then --input_text); dataset mode
runs one prompt per file of a folder and writes {file name: answer} to --results_save_path; an entry of the folder
that fails is recorded as {"error": why}, a hidden file or a sub-folder as {"skipped": why}. Without --model_path the
kit's bundled demo reader (a tiny Qwen2-VL trained to read words and numbers and name colours) answers, by default
the question its sample picture goes with. Bad input is one `Error: ...` line on stderr and exit status 1, found
before torch and the model load where it can be (flags, the checkpoint's config.json, the media files, the results
path: `atb_models.cli.prepare`); --debug shows the traceback instead. Ctrl-C exits 130, SIGTERM 143 and SIGHUP (the
terminal closed) 129, in dataset mode after writing the answers finished so far; --results_save_path replaces only a
results file of an earlier run, never a file of the user's.

A short warm-up request runs first and is never timed. With ATB_LLM_BENCHMARK_ENABLE=1 the run's step timings go to
the benchmark CSV (atb_models/benchmark/csv_report.py); --performance sweeps batch sizes and output lengths on
copies of the single-mode prompt, one CSV row each, and prints a table.

This module imports neither torch nor the engine (`atb_models.cli.prepare` checks the flags it parsed,
`atb_models.cli.infer` runs them), so --help is instant; each family's examples/models/<family>/run_pa.py calls `main`
with its `Family`.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from dataclasses import dataclass

from atb_models.cli.choices import DEVICE_CHOICES, DTYPE_CHOICES, QUANTIZE_CHOICES
from atb_models.cli.entry import FlagParser, configure_logging, one_line, run_entry_point
from atb_models.errors import UserError
from atb_models.ranks import env_state

DEFAULT_BATCH_SIZES = [1, 2, 4, 8, 16]  # --performance
DEFAULT_INPUT_TEXT = "Describe the image."


@dataclass(frozen=True)
class Family:
    """What run_pa says of the model family it runs."""

    name: str  # as users write it: "Qwen2-VL"
    example_checkpoint: str  # a real checkpoint of the family, suggested when the demo reader stands in


def build_parser(family: Family) -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="run_pa",
        description=f"{family.name} inference with paged attention (single prompt or a folder of media).")
    parser.add_argument("--model_path", metavar="DIR",
                        help=f"{family.name} checkpoint folder; absent: the kit's demo reader (atb_models/demo/"
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
    add_engine_arguments(parser, batch_help="requests running at once; single mode runs this many copies of the prompt")
    parser.add_argument("--cleanup_shm", action="store_true",
                        help="remove the shared-memory segments killed earlier runs left (listed in "
                             "--shm_name_save_path and its PATH.node<N> siblings), then exit")
    parser.add_argument("--results_save_path", metavar="PATH", default="./results.json",
                        help="dataset mode: where {file name: answer} is written; an existing file there that is not "
                             "a results file (a JSON object of answers), or is read-only, is refused and left "
                             "untouched, and so is a path under /dev or /proc")
    sampling = parser.add_argument_group("sampling (greedy by default)")
    sampling.add_argument("--temperature", type=float, metavar="X", default=0.0, help="0: greedy")
    sampling.add_argument("--top_k", type=int, metavar="N", default=0, help="0: no top-k cut")
    sampling.add_argument("--top_p", type=float, metavar="X", default=1.0, help="1.0: no nucleus cut")
    sampling.add_argument("--repetition_penalty", type=float, metavar="X", default=1.0, help="1.0: none")
    sampling.add_argument("--presence_penalty", type=float, metavar="X", default=0.0,
                          help="-2..2, 0: none; less X for each token the answer holds")
    sampling.add_argument("--frequency_penalty", type=float, metavar="X", default=0.0,
                          help="-2..2, 0: none; less X times each token's count in the answer")
    sampling.add_argument("--seed", type=int, metavar="N", help="makes sampling reproducible")
    sampling.add_argument("--ignore_eos", action="store_true", help="generate --max_output_length tokens every time")
    sampling.add_argument("--num_beams", type=int, metavar="N", default=1,
                          help="beam search of N beams (transformers' rule; no sampling flag goes with it): the best "
                               "answer is the one printed; 1: none")
    sampling.add_argument("--length_penalty", type=float, metavar="X", default=1.0,
                          help="with --num_beams: an answer's log-probability is divided by its length to the power "
                               "X (above 0 favours longer answers)")
    add_device_arguments(parser)
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


def add_engine_arguments(parser: argparse.ArgumentParser, batch_help: str, batch_default: int = 1) -> None:
    """The flags that size the engine (LLM's limits and its shared-memory list): run_pa's and the server's. The
    device flags follow in their own group (`add_device_arguments`)."""
    parser.add_argument("--max_batch_size", type=int, metavar="N", default=batch_default, help=batch_help)
    parser.add_argument("--max_input_length", type=int, metavar="N", default=4096,
                        help="prompt tokens, visual tokens included")
    parser.add_argument("--max_output_length", type=int, metavar="N", default=256, help="generated tokens per request")
    parser.add_argument("--max_prefill_tokens", type=int, metavar="N", default=-1,
                        help="prompt tokens per prefill step; -1: max_batch_size * (input + output length)")
    parser.add_argument("--enable_chunked_prefill", action="store_true",
                        help="compute prompts --max_prefill_tokens (-1: 2048) at a time, alternating with the "
                             "running requests' decode steps, so a long prompt holds them up one chunk at a time; "
                             "prompts longer than --max_prefill_tokens are then taken")
    parser.add_argument("--num_speculative_tokens", type=int, metavar="N", default=0,
                        help="speculative decoding by prompt lookup (0: off): each decode step of a greedy request "
                             "also checks up to N tokens guessed from what followed its last tokens earlier in its "
                             "prompt or answer; fewer steps where the guesses hold (answers that quote their input)")
    parser.add_argument("--prompt_lookup_max", type=int, metavar="N", default=3,
                        help="with --num_speculative_tokens: the longest run of last tokens looked up (1..8)")
    parser.add_argument("--block_size", type=int, metavar="N", default=128, help="tokens per KV-cache block")
    parser.add_argument("--shm_name_save_path", metavar="PATH", default="./shm_name.txt",
                        help="file listing the shared-memory segments through which ranks share media (world "
                             "size above 1); runs given the same path share it under a lock; a file at the path "
                             "that the kit did not write is refused and left untouched")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    kit = parser.add_argument_group("device and preprocessing")
    kit.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                     help="auto: config.json's torch_dtype, or a dtype this device runs fast (logged)")
    kit.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: npu, then cuda, then cpu")
    kit.add_argument("--no_prefix_caching", dest="enable_prefix_caching", action="store_false",
                     help="compute every prompt in full (by default full KV blocks a request shares with earlier "
                          "ones, same tokens and same images, are reused)")
    kit.add_argument("--encoder_cache_mb", type=int, metavar="N", default=256,
                     help="MiB of vision-tower outputs kept for images and videos seen again (0: none)")
    kit.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                     help="w8a16: the language model's linears as int8, quantized as they load from a float "
                          "checkpoint (a checkpoint written by `python -m atb_models.quantize` needs no flag)")
    kit.add_argument("--min_pixels", type=int, metavar="N", help="image pixel floor (default: the checkpoint's)")
    kit.add_argument("--max_pixels", type=int, metavar="N", help="image pixel ceiling (default: the checkpoint's)")
    kit.add_argument("--video_fps", type=float, metavar="X", default=0.5, help="video frames sampled per second")
    kit.add_argument("--video_max_frames", type=int, metavar="N", default=768, help="most frames taken from one video")
    kit.add_argument("--limit_mm_per_prompt", type=media_limits, metavar="image=N,video=M",
                     help="the most images and videos one request may hold (either may be left out; vLLM's JSON "
                          "object too); a request holding more fails alone (default: no limit)")


def engine_options(args: argparse.Namespace, **overrides) -> dict:
    """LLM's keyword arguments from the flags of `add_engine_arguments` and `add_device_arguments`; `overrides`
    replace some (run_pa's --performance sizes the engine for its largest point)."""
    names = ("dtype", "device", "max_batch_size", "max_input_length", "max_output_length", "block_size",
             "max_prefill_tokens", "min_pixels", "max_pixels", "video_fps", "video_max_frames", "shm_name_save_path",
             "quantize", "enable_prefix_caching", "encoder_cache_mb", "enable_chunked_prefill",
             "num_speculative_tokens", "prompt_lookup_max", "limit_mm_per_prompt")
    return {**{name: getattr(args, name) for name in names}, **overrides}


def positive_int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def media_limits(text: str) -> dict:
    """--limit_mm_per_prompt's value as LLM's limit_mm_per_prompt: image=N,video=M, either left out, or vLLM's JSON
    object {"image": N, "video": M}."""
    from atb_models.multimodal.media import check_media_limits  # (torch-free)

    if text.lstrip().startswith("{"):
        try:
            limits = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a JSON object such as {{\"image\": 2}}, got {text!r}") from None
    else:
        limits = {}
        for part in text.split(","):
            kind, equals, count = (side.strip() for side in part.partition("="))
            if not (kind and equals and re.fullmatch(r"-?[0-9]+", count)):
                raise argparse.ArgumentTypeError(f"expected image=N,video=M (either may be left out), got {text!r}")
            if kind in limits:
                raise argparse.ArgumentTypeError(f"{kind} is given twice in {text!r}")
            limits[kind] = int(count)
    try:
        return check_media_limits(limits)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None, family: Family) -> int:
    args = build_parser(family).parse_args(argv)

    def run() -> int:
        rank = env_state().rank
        configure_logging(rank)
        if args.cleanup_shm:
            return cleanup_shm(args.shm_name_save_path)
        # Bad input is news in a moment: the flags and files are checked before torch loads (prepare is torch-free)
        from atb_models.cli.prepare import plan_run

        plan = plan_run(args, family, rank)
        # torch and the engine; inside run_entry_point, so Ctrl-C, SIGTERM or SIGHUP during these imports already
        # ends in its one line
        from atb_models.cli import infer

        return infer.run(args, plan)

    return run_entry_point(run, debug=args.debug)


def cleanup_shm(name_file: str) -> int:
    """The segments listed at the path and at its siblings PATH.node<N> (the lists of a job's other nodes, where
    the path lies on a filesystem they share)."""
    from atb_models.multimodal.shm import remove_stale_segments  # torch-free, as this module

    for path in [name_file] + sorted(glob.glob(f"{glob.escape(name_file)}.node[0-9]*")):
        removed = remove_stale_segments(path)
        print(f"removed {len(removed)} shared-memory segment(s) listed in {one_line(path)}")
    return 0
