"""What the tools that time one cpu-small engine against another share: the checkpoint, and the A/B loop (a warm-up
run of each, then the engines in turn, their order swapped every repeat, and each figure's median)."""
from __future__ import annotations

import statistics


def cpu_small_engines(variants: dict, **options) -> dict:
    """{name: LLM} on the cpu-small benchmark checkpoint (built if missing), float32 on the CPU, with `options` for
    all and each variant's own keyword arguments on top."""
    from atb_models import LLM
    from atb_models.benchmark.presets import PRESETS, ensure_checkpoint

    checkpoint = str(ensure_checkpoint(PRESETS["cpu-small"]))
    return {name: LLM(checkpoint, dtype="float32", device="cpu", **options, **own) for name, own in variants.items()}


def alternate(engines: dict, one_run, repeats: int) -> dict:
    """{name: {figure: median}} of `one_run(llm)` (a dict of figures) over `repeats` runs of each engine, after a
    warm-up run of each; the engines run in turn, in swapped order every other repeat."""
    for llm in engines.values():
        one_run(llm)
    results = {name: [] for name in engines}
    for repeat in range(repeats):
        for name in list(engines) if repeat % 2 == 0 else list(reversed(engines)):
            results[name].append(one_run(engines[name]))
    return {name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            for name, runs in results.items()}
