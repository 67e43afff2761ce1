"""The bundled demo reader end to end: a Qwen2-VL trained to read (tools/train_reader.py) keeps its skill through
everything the kit does to a request. transformers' reference model answers its held-out sets; the modeltest
harness, run as users run it, reports the same answers and accuracy through the kit; the kit at 1, 2 and 4 ranks
gives the reference's tokens. (4 ranks and the trainer's determinism are marked slow: `-m slow` runs them.)
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atb_models.demo.reader import READER_MODEL_DIR
from tests.test_modeltest_harness import Run, mm_run
from tests.test_tensor_parallel import MAX_TOKENS, assert_equal_to_reference, run_ranks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from reader_data import (HELDOUT_SEED_STREAM, TASK_CONFIGS, harness_model, reference_backend, score,  # noqa: E402
                         write_textvqa)
from train_reader import HELDOUT_IMAGES, SegmentVisionAttention  # noqa: E402

HELDOUT = ROOT / "tests" / "modeltest" / "data" / "reader"
DATASETS = {"textvqa": HELDOUT / "textvqa" / "textvqa_val.jsonl", "videobench": HELDOUT / "videobench" / "Eval_QA"}
# The bar: pictures at least 90% right, clips at least 80%.
REQUIRED = {"textvqa": 0.9, "videobench": 0.8}
SEED = 0  # the committed checkpoint's


@pytest.fixture(scope="module")
def reference() -> dict:
    """Per task: transformers' accuracy (float32, greedy) on the held-out set, and its per-sample results."""
    harness = harness_model(READER_MODEL_DIR)
    backend = reference_backend(harness)
    return {task: score(task, dataset, harness, backend) for task, dataset in DATASETS.items()}


@pytest.mark.parametrize("task", DATASETS)
def test_reference_model_answers_the_held_out_questions(reference, task):
    accuracy, results = reference[task]
    assert accuracy >= REQUIRED[task], [(r.question_id, r.answer, r.gold) for r in results if not r.scores["acc"]]


@pytest.mark.parametrize("task", DATASETS)
def test_mm_run_reports_the_reference_answers_and_accuracy(reference, task, tmp_path):
    """mm_run.sh with the reader's task yaml, the kit batching four requests at a time."""
    result = mm_run(task, "--task_config_path", TASK_CONFIGS[task], "--model_path", READER_MODEL_DIR,
                    "--batch_size", 4, output_dir=tmp_path)
    run = Run(result, tmp_path, task, "pa", 4)
    accuracy, expected = reference[task]
    records = run.records()
    assert [(r["question_id"], r["answer"], r["output_tokens"]) for r in records] == [
        (r.question_id, r.answer, r.output_tokens) for r in expected]
    with open(run.result_csv, newline="") as f:
        overall = next(csv.DictReader(f))
    assert (overall["Tasks"], overall["Metric"]) == (task, "acc")
    assert float(overall["Value"]) == pytest.approx(accuracy)


@pytest.mark.parametrize("world_size", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_kit_gives_the_reference_tokens_at_every_world_size(reference, world_size, tmp_path):
    """Every held-out picture and clip, with the harness's prompts, through tensor-parallel ranks: the same tokens
    (answer, end token and beyond) and logits as transformers."""
    requests = [r.request for task in DATASETS for r in reference[task][1]]
    out = run_ranks(tmp_path, world_size, {"model": str(READER_MODEL_DIR), "requests": requests,
                                           "max_tokens": MAX_TOKENS, "max_batch_size": 8})
    assert_equal_to_reference(READER_MODEL_DIR, requests, out)


def test_the_committed_held_out_pictures_are_what_the_seed_draws(tmp_path):
    """The trainer regenerates the committed set from the checkpoint's seed: same questions, same pixels (up to
    JPEG decoding)."""
    made = write_textvqa(tmp_path, np.random.default_rng([SEED, HELDOUT_SEED_STREAM, 0]), HELDOUT_IMAGES)
    committed = DATASETS["textvqa"]
    assert made.read_text() == committed.read_text()
    annotations = committed.with_name(committed.stem + "_annotations.json")
    assert made.with_name(annotations.name).read_text() == annotations.read_text()
    for name in ("reader_000.jpg", f"reader_{HELDOUT_IMAGES - 1:03d}.jpg"):
        ours = np.asarray(Image.open(tmp_path / "images" / name), dtype=np.int16)
        theirs = np.asarray(Image.open(committed.parent / "images" / name), dtype=np.int16)
        assert np.abs(ours - theirs).max() <= 2


def test_training_attention_computes_what_transformers_vision_attention_does():
    """The trainer's segment-wise vision attention (no dense mask) against VisionSdpaAttention, on two segments
    of one length and on segments of different lengths."""
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionRotaryEmbedding, VisionSdpaAttention

    torch.manual_seed(0)
    attention = VisionSdpaAttention(32, num_heads=4)
    rotary = VisionRotaryEmbedding(8)(30)
    for lengths in ([12, 12], [8, 20, 2]):
        cu_seqlens = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
        x = torch.randn(sum(lengths), 32)
        freqs = rotary[torch.randint(0, 30, (sum(lengths),))]
        expected = attention(x, cu_seqlens, freqs)
        attention.__class__ = SegmentVisionAttention
        got = attention(x, cu_seqlens, freqs)
        attention.__class__ = VisionSdpaAttention
        assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.slow  # three runs of the trainer
def test_training_is_deterministic_given_its_seed(tmp_path):
    """Two short runs of the trainer with one seed write the same weights; another seed writes others."""
    def weights(name: str, seed: int) -> bytes:
        out = tmp_path / name
        command = [sys.executable, str(ROOT / "tools" / "train_reader.py"), "--output", str(out), "--seed", str(seed),
                   "--steps", "3", "--no_eval"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return (out / "model.safetensors").read_bytes()

    first = weights("first", 7)
    assert weights("again", 7) == first
    assert weights("other", 8) != first


@pytest.mark.parametrize("task", DATASETS)
def test_the_reader_quantized_to_int8_gives_the_float_answers(reference, task, tmp_path):
    """mm_run.sh --quantize w8a16 (the reader's linears in int8 as they load): every held-out picture and clip
    answered with the float reference's tokens, reported under pa_w8a16."""
    result = mm_run(task, "--task_config_path", TASK_CONFIGS[task], "--model_path", READER_MODEL_DIR,
                    "--batch_size", 4, "--quantize", "w8a16", output_dir=tmp_path)
    run = Run(result, tmp_path, task, "pa_w8a16", 4)
    accuracy, expected = reference[task]
    assert [(r["question_id"], r["answer"], r["output_tokens"]) for r in run.records()] == [
        (r.question_id, r.answer, r.output_tokens) for r in expected]
    assert "w8a16 (per output channel, quantized as loaded)" in run.result_txt.read_text()
