"""run_pa's run as planned from its flags, everything checked that needs no model: the flags, the checkpoint
folder's config.json, the media files or the dataset folder, the results and benchmark paths.

Torch-free, so bad input is one `Error:` line before torch, transformers and the weights load (they take seconds);
`atb_models.cli.infer` runs the plan.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from atb_models.benchmark.timed_runs import check_csv_path
from atb_models.cli.inputs import Entry, check_results_path, dataset_entries, single_prompt
from atb_models.cli.run_pa import DEFAULT_BATCH_SIZES, DEFAULT_INPUT_TEXT, Family
from atb_models.config import check_model_folder
from atb_models.engine.sampling_params import BeamSearchParams
from atb_models.engine.limits import check_limits, check_speculative
from atb_models.engine.sampling_params import SamplingParams
from atb_models.errors import UserError
from atb_models.multimodal.media import check_media_counts, classify_media


@dataclass
class RunPlan:
    """What run_pa will run, checked. Single mode holds its one prompt's items (`prompt`), copied once the engine
    has capped --max_batch_size by memory; dataset mode one entry per entry of the folder (`entries`)."""

    rank: int
    model_path: str
    params: SamplingParams
    beams: BeamSearchParams | None  # --num_beams above 1: beam search in place of sampling
    batch_sizes: list[int]      # --performance's sweep; otherwise [--max_batch_size]
    output_lengths: list[int]   # likewise: [--max_output_length] unless --performance sweeps them
    prompt: list | None = None
    entries: list[Entry] | None = None
    results_path: str | None = None  # dataset mode, rank 0: where the answers go (a link followed)

    @property
    def dataset_mode(self) -> bool:
        return self.entries is not None


def plan_run(args: argparse.Namespace, family: Family, rank: int) -> RunPlan:
    """The run's plan from run_pa's flags on this rank, or a UserError at the first check that fails: the flags
    that go together, the sampling values, the benchmark and results paths, the media (single mode) or the folder's
    entries (dataset mode: a bad entry fails only itself), the engine's limits, the checkpoint folder."""
    if (args.batch_sizes or args.output_lengths) and not args.performance:
        raise UserError("--batch_sizes and --output_lengths go with --performance")
    if args.performance and args.dataset_path is not None:
        raise UserError("--performance runs copies of one prompt: give --input_image, not --dataset_path")
    model_path, text, paths = args.model_path, args.input_text, args.input_image
    if model_path is None:
        from atb_models.demo.reader import READER_MODEL_DIR, reader_samples

        model_path = str(READER_MODEL_DIR)
        if rank == 0:
            print(f"Note: no --model_path given, so the kit's demo reader in {model_path} is used: a tiny Qwen2-VL "
                  "trained only to read a word or number and name colours (see its README.md). Pass --model_path "
                  f"/path/to/{family.example_checkpoint} for a real model.", file=sys.stderr, flush=True)
        samples = reader_samples()
        if not paths and args.dataset_path is None:
            paths = [str(samples["image"].path)]
        if text is None:  # the question of the first medium's kind: read a sign, how a clip ends
            text = samples[classify_media(paths[0]) if paths else "image"].question
    text = DEFAULT_INPUT_TEXT if text is None else text

    plan = RunPlan(rank, model_path, sampling_params(args), beam_search_params(args),
                   batch_sizes=(args.batch_sizes or DEFAULT_BATCH_SIZES) if args.performance else [args.max_batch_size],
                   output_lengths=args.output_lengths or [args.max_output_length])
    check_csv_path(args.performance, rank)
    if args.dataset_path is not None:
        # Rank 0 writes the results; on a node of its own, another rank's folder need not hold the path.
        plan.results_path = check_results_path(args.results_save_path) if rank == 0 else None
        plan.entries = dataset_entries(args.dataset_path, text)
    elif paths:
        plan.prompt = single_prompt(paths, text)
        # (here, not after the model loads: single mode's every request is this one)
        check_media_counts([kind for item in plan.prompt for kind in item], args.limit_mm_per_prompt or {})
    else:
        raise UserError("give --input_image or --dataset_path")
    # The engine's limits, then the folder (the order LLM checks them in): what is wrong with the request is said
    # even where the folder is wrong too.
    check_limits(max(plan.batch_sizes), args.max_input_length, max(plan.output_lengths), args.block_size,
                 args.max_prefill_tokens, encoder_cache_mb=args.encoder_cache_mb)
    check_speculative(args.num_speculative_tokens, args.prompt_lookup_max)
    if args.model_path is not None:
        check_model_folder(model_path)
    return plan


def beam_search_params(args: argparse.Namespace) -> BeamSearchParams | None:
    """--num_beams' BeamSearchParams, None for 1 (sampling). Beam search ranks answers by their log-probabilities:
    a sampling flag away from its default would be ignored, so it is refused."""
    if args.num_beams == 1:
        if args.length_penalty != 1.0:
            raise UserError("--length_penalty goes with --num_beams above 1")
        return None
    if args.performance:
        raise UserError("--performance times sampling, not --num_beams")
    sampling = [f"--{flag}" for flag, default in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0),
                                                  ("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                                                  ("frequency_penalty", 0.0), ("seed", None))
                if getattr(args, flag) != default]
    if sampling:
        raise UserError(f"--num_beams searches beams by their log-probabilities, without sampling: "
                        f"{', '.join(sampling)} cannot go with it")
    try:
        return BeamSearchParams(beam_width=args.num_beams, length_penalty=args.length_penalty,
                                ignore_eos=args.ignore_eos)
    except UserError as e:
        raise UserError(f"--{e}".replace("--beam_width", "--num_beams")) from None


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The run's SamplingParams, made before the model loads so that a bad value is refused at once. max_tokens
    is left to the engine's --max_output_length (--performance sets it per point)."""
    for flag in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = getattr(args, flag)
        if not math.isfinite(value):
            raise UserError(f"--{flag} must be a finite number, got {value}")
    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=args.seed, ignore_eos=args.ignore_eos)
    except UserError as e:  # its message starts with the field's name: on the command line, the flag's
        raise UserError(f"--{e}") from None
