"""The run: each subset's samples through a backend, each answer scored, the scores summed into a metric table."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from modeltest.backends import Generation
from modeltest.tasks import Subset, Task


@dataclass
class SampleResult:
    subset: str                 # the subset's display name
    question_id: object
    request: list               # the model input
    prompt: str                 # its text
    answer: str                 # the model's output
    prediction: object          # what the scorer read from it
    gold: object
    scores: dict                # metric -> score in [0, 1]; 0 for a failed sample
    prompt_tokens: int
    output_tokens: int
    seconds: float
    finish_reason: str
    error: str | None
    cached_prompt_tokens: int = 0   # prompt tokens whose K/V came from the prefix cache
    cached_visual_items: int = 0    # images / videos that skipped the vision tower


@dataclass
class MetricRow:
    tasks: str                  # the task for the overall row, else the subset's name
    total: int
    failed: int
    passed: float               # sum of the scores (fractional for TextVQA's soft accuracy)
    metric: str
    value: float                # passed / total: a failed sample counts as wrong


def run_subset(task: Task, subset: Subset, backend, rank_zero: bool) -> list[SampleResult] | None:
    """Every sample of the subset, in dataset order; None on other ranks than 0, which hold no outputs."""
    runnable = [sample for sample in subset.samples if sample.error is None]
    with tqdm(total=len(subset.samples), desc=subset.name, unit="sample", disable=not rank_zero,
              dynamic_ncols=True) as bar:
        bar.update(len(subset.samples) - len(runnable))
        generations = backend.generate([sample.request for sample in runnable], lambda: bar.update(1))
    if not rank_zero:
        return None
    by_sample = dict(zip(map(id, runnable), generations))
    results = []
    for sample in subset.samples:
        generation = by_sample.get(id(sample)) or Generation(error=sample.error)
        score = task.zero_score() if generation.error is not None else task.score(sample, generation.text)
        results.append(SampleResult(subset.name, sample.question_id, sample.request, sample.prompt, generation.text,
                                    score.prediction, sample.gold, score.values, generation.prompt_token_count,
                                    generation.token_count, generation.seconds, generation.finish_reason,
                                    generation.error, generation.cached_prompt_tokens,
                                    generation.cached_visual_items))
    return results


def metric_rows(task: Task, results_by_subset: list[tuple[str, list[SampleResult]]]) -> list[MetricRow]:
    """The overall rows (one per metric), then each subset's."""
    everything = [result for _, results in results_by_subset for result in results]
    groups = [(task.name, everything)] + list(results_by_subset)
    rows = []
    for name, results in groups:
        failed = sum(result.error is not None for result in results)
        for metric in task.metrics:
            passed = sum(result.scores[metric] for result in results)
            rows.append(MetricRow(name, len(results), failed, passed, metric,
                                  passed / len(results) if results else 0.0))
    return rows
