"""`compare`: the same workloads through the kit and through transformers in one process, alternating, after a
warm-up, medians over repeats; plus the decode floor from the machine measured in the same run.

- single:  one image plus a question, batch 1: end-to-end latency and first-token time;
- batch16: 16 requests of growing images and mixed output lengths: total time, against transformers one request
           at a time and in one left-padded batch (which runs every row to the longest output);
- decode:  wall time per decode step at each batch size, against the floor (floors.py). This VM's memory speed
           swings by half within minutes, so every decode run is bracketed by its own measurement of the machine
           and divided by the floor of that moment (the better of the two readings); the figure is the median of
           those ratios. The table also gives the steps against the run's best floor of all.

Beside the kit, in the same alternation: with `quantize`, the kit quantized (every workload); where the kit does not
stream float32 weights (a bfloat16 language model, or a float32 one whose weights are bfloat16 values, packed at
half the bytes), the kit in float32 with float32 weights on decode_bs1 (FLOAT32_KIT), so that the bf16 and int8
steps are measured against the float32 weights' step of the same minutes. Each kit mode's floor counts the bytes
its own weights take.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial, reduce
from pathlib import Path
from typing import Callable

import torch

from atb_models import LLM
from atb_models.benchmark import floors
from atb_models.benchmark.engines import KitEngine, ReferenceEngine, Request, Timing
from atb_models.benchmark.presets import Preset, Workloads, benchmark_dir
from atb_models.config import kit_home
from atb_models.demo.checkpoint import make_image
from atb_models.errors import UserError
from atb_models.platform import cpu_capabilities

logger = logging.getLogger("atb_models.benchmark")

WORKLOADS = ("single", "batch16", "decode")
FLOAT32_KIT = "kit_fp32"  # the kit in float32 with float32 weights, beside one that reads fewer; decode_bs1 only


def make_requests(workloads: Workloads, media_dir: Path) -> dict[str, list[Request]]:
    """Each workload's requests; the images are written once into media_dir."""
    media_dir.mkdir(parents=True, exist_ok=True)

    def image(size: tuple[int, int], seed: int) -> str:
        path = media_dir / f"image_{size[0]}x{size[1]}_{seed}.png"
        if not path.is_file():
            make_image(path, width=size[0], height=size[1], seed=seed)
        return str(path)

    question = {"text": workloads.question}
    requests = {
        "single": [Request([{"image": image(workloads.single_image, 0)}, question], workloads.single_tokens)],
        "batch16": [Request([{"image": image(size, i + 1)}, question], tokens)
                    for i, (size, tokens) in enumerate(zip(workloads.batch_images, workloads.batch_tokens))],
    }
    for batch_size in workloads.decode_batch_sizes:
        requests[f"decode_bs{batch_size}"] = [Request([{"text": workloads.decode_prompt}], workloads.decode_steps + 1)
                                              for _ in range(batch_size)]
    return requests


@dataclass
class Results:
    """Every timed run, by (workload, mode); the medians and ratios are derived from them."""
    runs: dict = field(default_factory=dict)
    machine: floors.Machine | None = None  # the best of the readings at the start and the end of the run
    probes: dict = field(default_factory=dict)  # (workload, mode): the machine as read around each of its runs
    decode_params: int = 0
    bytes_per_param: int = 4
    tokens_match: dict = field(default_factory=dict)
    first_difference: dict = field(default_factory=dict)  # workload -> (the first differing step, of how many)
    decode_bytes: dict = field(default_factory=dict)  # kit mode -> bytes of weights a decode step reads
    top1_agreement: float | None = None  # w8a16's teacher-forced argmax against the float kit's greedy tokens

    def add(self, workload: str, mode: str, timing: Timing) -> None:
        self.runs.setdefault((workload, mode), []).append(timing)

    def median(self, workload: str, mode: str, figure: str) -> float:
        return statistics.median(getattr(t, figure) for t in self.runs[(workload, mode)])

    def has(self, workload: str) -> bool:
        return any(key[0] == workload for key in self.runs)

    @property
    def quantized_modes(self) -> list[str]:
        return [mode for mode in self.decode_bytes if mode not in ("kit", FLOAT32_KIT)]

    def float_reference(self) -> str:
        """The mode the *_vs_fp32 figures divide by: the float32-weights kit where it ran, else the kit."""
        return FLOAT32_KIT if ("decode_bs1", FLOAT32_KIT) in self.runs else "kit"

    def floor(self, batch_size: int, machine: floors.Machine | None = None, mode: str = "kit") -> float:
        return floors.decode_floor(self.decode_params, self.bytes_per_param, batch_size, machine or self.machine,
                                   self.decode_bytes.get(mode))

    def paired_floor(self, workload: str, batch_size: int, mode: str = "kit") -> float:
        """The median floor of the moments a mode's runs of a workload were timed in."""
        return statistics.median(self.floor(batch_size, m, mode) for m in self.probes[(workload, mode)])

    def per_step_vs_floor(self, workload: str, mode: str, batch_size: int) -> float:
        """The median over runs of the decode step against the floor (of the mode's bytes) of the run's moment."""
        return statistics.median(timing.per_token / self.floor(batch_size, machine, mode)
                                 for timing, machine in zip(self.runs[(workload, mode)],
                                                            self.probes[(workload, mode)]))


def _alternate(results: Results, workload: str, runs: dict, repeats: int,
               probe: Callable[[], floors.Machine] | None = None) -> None:
    """Each mode once per repeat; the order flips every repeat so a drift in the machine's load hits all alike.
    With `probe`, the machine is measured just before and just after each run (results.probes)."""
    modes = list(runs)
    for repeat in range(repeats):
        for mode in modes if repeat % 2 == 0 else reversed(modes):
            before = probe() if probe else None
            start = time.perf_counter()
            results.add(workload, mode, runs[mode]())
            if probe:
                results.probes.setdefault((workload, mode), []).append(before.best_of(probe()))
            logger.info("%s / %s: repeat %d of %d in %.1f s", workload, mode, repeat + 1, repeats,
                        time.perf_counter() - start)


def run_compare(preset: Preset, model_path: str, dtype: str, device: str, repeats: int,
                workloads: tuple[str, ...], quantize: str | None = None,
                quant_algorithm: str = "gptq") -> tuple[Results, dict]:
    """Runs the chosen workloads; returns the results and a description of the set-up for the report. With
    `quantize`, the kit also runs quantized (mode "kit_w8a16") beside its float self: on the quantize tool's output
    with `quant_algorithm` "gptq", quantized at load with "rtn". Where the kit does not stream float32 weights, a
    float32 kit with float32 weights (FLOAT32_KIT) runs decode_bs1 beside it."""
    load_before = os.getloadavg()[0]
    w = preset.workloads
    # Prefix caching off: transformers has none, and the kit would answer each repeat's prompt from its cache.
    settings = dict(dtype=dtype, device=device, max_batch_size=max(len(w.batch_images), *w.decode_batch_sizes),
                    max_input_length=preset.max_input_length, max_output_length=preset.max_output_length,
                    enable_prefix_caching=False)
    llm = LLM(model_path, **settings)
    if llm.quantization is not None:
        raise UserError(f"{model_path} is quantized ({llm.quantization.method}): compare takes the float checkpoint "
                        "(and --quantize to run the kit quantized beside it)")
    kits = {"kit": KitEngine(llm)}
    quantized_by = None
    with ExitStack() as cleanup:
        if quantize and quant_algorithm == "rtn":
            kits[f"kit_{quantize}"] = KitEngine(LLM(model_path, quantize=quantize, **settings))
            quantized_by = f"{quantize}, round-to-nearest at load"
        elif quantize:
            path = quantized_checkpoint(preset, model_path, quantize, quant_algorithm, cleanup)
            kits[f"kit_{quantize}"] = KitEngine(LLM(str(path), **settings))
            quantized_by = f"{quantize} by {quant_algorithm} (the quantize tool, built-in calibration set): {path}"
        if not _streams_float32_weights(llm) and "decode" in workloads:
            kits[FLOAT32_KIT] = KitEngine(LLM(model_path, **{**settings, "dtype": "float32"}, cpu_linear="panel"))
        reference = ReferenceEngine(llm.model_config, llm.plan, llm.preprocessor)
        try:
            results, setup = _run_workloads(preset, model_path, workloads, repeats, kits, reference, load_before)
        finally:
            reference.close()
    if quantized_by:
        setup["quantized"] = quantized_by
    return results, setup


def _streams_float32_weights(llm: LLM) -> bool:
    """Whether the language model's decoder layers hold their linear weights in float32."""
    return all(p.dtype == torch.float32 for name, p in llm.runner.model.model.named_parameters()
               if name.startswith("layers.") and p.dim() >= 2)


def quantized_checkpoint(preset: Preset, model_path: str, method: str, algorithm: str, cleanup: ExitStack) -> Path:
    """The quantize tool's output of `model_path`: kept beside the preset's own checkpoint (written once, reused),
    or, for another checkpoint, written into a temporary folder that `cleanup` removes."""
    from atb_models.calibration import VERSION
    from atb_models.quantize import quantize_checkpoint

    own = benchmark_dir(preset) / "checkpoint"
    if Path(model_path).resolve() == own.resolve():
        target = benchmark_dir(preset) / f"checkpoint-{method}-{algorithm}-v{VERSION}"
        if not target.is_dir():
            logger.info("quantizing the %s checkpoint by %s into %s (once)", preset.name, algorithm, target)
            quantize_checkpoint(model_path, str(target), method, None, False, algorithm)
        return target
    temporary = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="atb-compare-", dir=kit_home())))
    logger.info("quantizing %s by %s for this run", model_path, algorithm)
    quantize_checkpoint(model_path, str(temporary / "quantized"), method, None, False, algorithm)
    return temporary / "quantized"


def _run_workloads(preset: Preset, model_path: str, workloads: tuple[str, ...], repeats: int, kits: dict,
                   reference: ReferenceEngine, load_before: float) -> tuple[Results, dict]:
    w, kit = preset.workloads, kits["kit"]
    llm, plan = kit.llm, kit.plan
    requests = make_requests(w, benchmark_dir(preset) / "media")
    results = Results(decode_params=floors.decode_params(reference.model), bytes_per_param=plan.llm_dtype.itemsize,
                      decode_bytes={mode: floors.kit_decode_bytes(engine.llm.runner.model)
                                    for mode, engine in kits.items()})

    def measure_machine() -> floors.Machine:
        config = llm.model_config.hf_config
        return floors.measure_machine(plan, config.hidden_size, config.intermediate_size, preset.bandwidth_bytes)

    results.machine = measure_machine()
    logger.info("warm-up: every workload's first request, a few tokens, on every side")
    def kits_of(workload: str) -> dict:
        return {mode: engine for mode, engine in kits.items() if mode != FLOAT32_KIT or workload == "decode_bs1"}

    warm = [Request(requests["single"][0].items, 2)]
    for engine in kits_of("single").values():
        engine.run(warm)
    reference.run_one_at_a_time(warm)
    for batch_size in w.decode_batch_sizes:
        short = [Request(r.items, 2) for r in requests[f"decode_bs{batch_size}"]]
        for engine in kits_of(f"decode_bs{batch_size}").values():
            engine.run(short)
        reference.run_batched(short, batch_size)

    def kit_runs(workload: str, batch) -> dict:
        return {mode: partial(engine.run, batch) for mode, engine in kits_of(workload).items()}

    if "single" in workloads:
        single = requests["single"]
        _alternate(results, "single", {**kit_runs("single", single),
                                       "hf": partial(reference.run_one_at_a_time, single)}, repeats)
        ours, theirs = (results.runs[("single", side)][-1].token_ids[0] for side in ("kit", "hf"))  # its one request
        results.tokens_match["single"] = ours == theirs
        if ours != theirs:
            results.first_difference["single"] = first_difference(ours, theirs), max(len(ours), len(theirs))
    if "batch16" in workloads:
        batch = requests["batch16"]
        _alternate(results, "batch16", {**kit_runs("batch16", batch),
                                        "hf_one_at_a_time": partial(reference.run_one_at_a_time, batch),
                                        "hf_batched": partial(reference.run_batched, batch, len(batch))}, repeats)
    if "decode" in workloads:
        for batch_size in w.decode_batch_sizes:
            batch = requests[f"decode_bs{batch_size}"]
            _alternate(results, f"decode_bs{batch_size}",
                       {**kit_runs(f"decode_bs{batch_size}", batch),
                        "hf": partial(reference.run_batched, batch, batch_size)},
                       repeats, probe=measure_machine)
    results.machine = results.machine.best_of(measure_machine())
    if results.quantized_modes:
        results.top1_agreement = _top1_agreement(results, requests, kits[results.quantized_modes[0]])

    setup = {
        "preset": f"{preset.name}: {preset.description}",
        "checkpoint": model_path,
        "device": plan.describe(),
        "kit": "prefix caching off (repeats would be answered from the cache; tools/bench_prefix_cache.py times it)",
        "reference": reference.model.description,
        "host": f"{cpu_capabilities().name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                f"python {platform.python_version()}",
        "repeats": f"{repeats} per workload and side (medians), after one warm-up",
        # Other processes on the CPU slow both sides, and unevenly: a load above the core count flags such a run.
        "load": f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
                f"on {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    emulated = isa_limits()
    if emulated:
        setup["emulation"] = emulated
    return results, setup


# The switches that limit each library to a narrower instruction set than the CPU's: how a run emulates an older CPU
# (an AVX2-only one on an AVX-512 machine, docs/PERFORMANCE.md). MKL runs PyTorch's float32 matmuls (transformers' and
# the probe's); unless it is limited too, the reference and the floor are an AVX-512 CPU's (here 1.6x AVX2's rate).
ISA_SWITCHES = (("ATEN_CPU_CAPABILITY", "PyTorch's kernels"), ("ONEDNN_MAX_CPU_ISA", "oneDNN"),
                ("MKL_ENABLE_INSTRUCTIONS", "MKL"))


def isa_limits(environ=os.environ) -> str | None:
    """A line saying which libraries a run limits to a narrower instruction set and which it leaves at the CPU's,
    where it limits any (None otherwise)."""
    if not any(environ.get(name) for name, _ in ISA_SWITCHES):
        return None
    return ", ".join(f"{library} {name}={environ[name]}" if environ.get(name) else f"{library} at the CPU's own ISA "
                     f"({name} unset)" for name, library in ISA_SWITCHES)


def first_difference(ours: list, theirs: list) -> int:
    """The index of the first token where two outputs part (the shorter one's length where one extends the other)."""
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))


def _top1_agreement(results: Results, requests: dict, engine: KitEngine) -> float | None:
    """Over the float kit's greedy outputs of single and batch16 (their last timed runs), the fraction of positions
    where `engine`'s teacher-forced argmax is the same token."""
    same = total = 0
    for workload in ("single", "batch16"):
        if not results.has(workload):
            continue
        for request, tokens in zip(requests[workload], results.runs[(workload, "kit")][-1].token_ids):
            chosen = engine.teacher_forced_argmax(request.items, tokens)
            same += sum(a == b for a, b in zip(chosen, tokens))
            total += len(tokens)
    return same / total if total else None


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def figures(results: Results, decode_batch_sizes: tuple[int, ...]) -> dict[str, float]:
    """The closing figures: speedups over transformers (its better mode for batch16), decode against the floor."""
    out = {}
    if results.has("single"):
        out["speedup_vs_hf[single]"] = (results.median("single", "hf", "seconds")
                                        / results.median("single", "kit", "seconds"))
    if results.has("batch16"):
        best_hf = min(results.median("batch16", mode, "seconds") for mode in ("hf_one_at_a_time", "hf_batched"))
        out["speedup_vs_hf[batch16]"] = best_hf / results.median("batch16", "kit", "seconds")
    for batch_size in decode_batch_sizes:
        if results.has(f"decode_bs{batch_size}"):
            out[f"decode_vs_floor[bs{batch_size}]"] = results.per_step_vs_floor(f"decode_bs{batch_size}", "kit",
                                                                               batch_size)
    for method in [mode.removeprefix("kit_") for mode in results.quantized_modes]:
        if results.has("decode_bs1"):
            out[f"decode_vs_fp32[bs1]"] = (results.median("decode_bs1", f"kit_{method}", "per_token")
                                           / results.median("decode_bs1", results.float_reference(), "per_token"))
            out[f"decode_vs_floor_{method}[bs1]"] = results.per_step_vs_floor("decode_bs1", f"kit_{method}", 1)
        if results.top1_agreement is not None:
            out[f"top1_agreement_{method}"] = results.top1_agreement
    if ("decode_bs1", FLOAT32_KIT) in results.runs and results.bytes_per_param == 2:
        out["decode_bf16_vs_fp32[bs1]"] = (results.median("decode_bs1", "kit", "per_token")
                                           / results.median("decode_bs1", FLOAT32_KIT, "per_token"))
    return out


def report(results: Results, setup: dict, preset: Preset) -> str:
    """A table of the medians, then one `name: value` line per figure."""
    lines = [f"{key}: {value}" for key, value in setup.items()]
    machine = results.machine
    lines.append(f"machine: memory bandwidth {machine.bandwidth / 1e9:.1f} GB/s, matmul "
                 f"{machine.matmul_rate / 1e9:.1f} GFLOP/s ({str(results.bytes_per_param * 8)}-bit floats), the "
                 f"best of the readings at the start and the end; decode reads {results.decode_params / 1e6:.1f} M "
                 f"parameters")
    around = [m for readings in results.probes.values() for m in readings]
    fastest = reduce(floors.Machine.best_of, around, machine)
    if around:
        lines.append(f"machine around the decode runs: memory bandwidth "
                     f"{min(m.bandwidth for m in around) / 1e9:.1f}-{max(m.bandwidth for m in around) / 1e9:.1f} "
                     f"GB/s, matmul {min(m.matmul_rate for m in around) / 1e9:.1f}-"
                     f"{max(m.matmul_rate for m in around) / 1e9:.1f} GFLOP/s")
    rows = [("workload", "figure", "kit", "transformers", "hf / kit")]

    def row(workload, label, kit_value, hf_value, unit_ms=True):
        fmt = _ms if unit_ms else (lambda s: f"{s:.2f}")
        rows.append((workload, label, fmt(kit_value), fmt(hf_value), f"{hf_value / kit_value:.2f}"))

    if results.has("single"):
        for figure, label in (("seconds", "end-to-end (ms)"), ("first_token", "first token (ms)"),
                              ("per_token", "per decode step (ms)")):
            row("single", label, results.median("single", "kit", figure), results.median("single", "hf", figure))
        same = "identical"
        if not results.tokens_match.get("single"):
            step, count = results.first_difference["single"]
            same = f"differ from step {step + 1} of {count} (random weights: near-ties)"
        lines.append(f"single: kit and transformers tokens {same}")
    if results.has("batch16"):
        kit_s = results.median("batch16", "kit", "seconds")
        for mode, label in (("hf_one_at_a_time", "total (s), hf one at a time"),
                            ("hf_batched", "total (s), hf left-padded batch")):
            row("batch16", label, kit_s, results.median("batch16", mode, "seconds"), unit_ms=False)
    for batch_size in preset.workloads.decode_batch_sizes:
        workload = f"decode_bs{batch_size}"
        if results.has(workload):
            kit_step, hf_step = (results.median(workload, mode, "per_token") for mode in ("kit", "hf"))
            row(workload, "per decode step (ms)", kit_step, hf_step)
            paired = _ms(results.paired_floor(workload, batch_size))
            rows.append((workload, f"per decode step / floor of its moment (median {paired} ms)",
                         *(f"{results.per_step_vs_floor(workload, mode, batch_size):.2f}" for mode in ("kit", "hf")),
                         ""))
            best = results.floor(batch_size, fastest)
            rows.append((workload, f"per decode step / the run's best floor of {_ms(best)} ms",
                         f"{kit_step / best:.2f}", f"{hf_step / best:.2f}", ""))
            rows.append((workload, "kit forward + sampling only (ms)", _ms(results.median(workload, "kit", "in_step")),
                         "", ""))
    lines.append(f"kit: a decode step reads {results.decode_bytes.get('kit', 0) / 1e6:.1f} MB of weights")
    for mode in results.quantized_modes:
        lines.append(f"{mode}: the kit with its language model's linears quantized; a decode step reads "
                     f"{results.decode_bytes[mode] / 1e6:.1f} MB of weights")
        for workload in [key[0] for key in results.runs if key[1] == mode]:
            figure = "seconds" if workload in ("single", "batch16") else "per_token"
            unit = "end-to-end (s)" if figure == "seconds" else "per decode step (ms)"
            scale = 1 if figure == "seconds" else 1000
            ours, fp = (scale * results.median(workload, m, figure) for m in (mode, "kit"))
            rows.append((workload, f"{mode} {unit} / the float kit's", f"{ours:.2f}", f"{fp:.2f}",
                         f"{ours / fp:.2f}"))
    if ("decode_bs1", FLOAT32_KIT) in results.runs:
        lines.append(f"{FLOAT32_KIT}: the kit with its language model in float32 and float32 weights (reading "
                     f"{results.decode_bytes.get(FLOAT32_KIT, 0) / 1e6:.1f} MB a step), timed on decode_bs1 beside the "
                     "others: the reference of the *_vs_fp32 figures")
        ours, fp = (1000 * results.median("decode_bs1", m, "per_token") for m in ("kit", FLOAT32_KIT))
        rows.append(("decode_bs1", f"kit per decode step (ms) / {FLOAT32_KIT}'s", f"{ours:.2f}", f"{fp:.2f}",
                     f"{ours / fp:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.append("")
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    # The quantized kit's figures sit close to their targets (0.45, 1.3, 0.98): one more decimal.
    lines += [f"{name}: {value:.3f}" if name.endswith(("fp32[bs1]", "w8a16[bs1]", "w8a16")) else f"{name}: {value:.2f}"
              for name, value in figures(results, preset.workloads.decode_batch_sizes).items()]
    return "\n".join(lines)
