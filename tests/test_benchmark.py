"""The benchmark tools: run_pa's CSV (columns, definitions, who writes it, the --performance sweep) and
`python -m atb_models.benchmark compare` end to end on the tiny preset. No test asserts a timing."""

from __future__ import annotations

import csv
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from atb_models.benchmark import floors
from atb_models.benchmark.csv_report import COLUMNS, RunSummary, write_csv
from atb_models.benchmark.engines import reference_inputs
from atb_models.benchmark.presets import PRESETS
from atb_models.engine.llm import RequestOutput, StepRecord
from atb_models.errors import UserError
from tests.test_kernels import NATIVE_BF16, NO_NATIVE_BF16

ROOT = Path(__file__).resolve().parents[1]
RUN_PA_SH = ROOT / "examples" / "models" / "qwen2_vl" / "run_pa.sh"
COMMON_ARGS = ["--world_size", "1", "--device", "cpu", "--dtype", "float32", "--max_input_length", "512"]
LOG_LINE = re.compile(r"Prefill time: \d+\.\d\dms, Prefill average time: \d+\.\d\dms, "
                      r"Decode token time: \d+\.\d\dms, E2E time: \d+\.\d\dms")


def run_pa(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("ATB_LLM_BENCHMARK_")}
    full_env.update(PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(RUN_PA_SH), *COMMON_ARGS, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]


def output(prompt_tokens: int, generated: int, error: str | None = None) -> RequestOutput:
    return RequestOutput(0, "", token_ids=list(range(generated)), prompt_token_count=prompt_tokens, error=error)


# ------------------------------------------------------------------------------------------- CSV definitions

def test_decode_token_time_divides_by_the_decode_steps_actually_run():
    # Configured for 8 tokens, the longest request stopped at 4: three decode steps ran, not seven.
    records = [StepRecord(True, 2, 300, 0.4), StepRecord(False, 2, 2, 0.1), StepRecord(False, 2, 2, 0.2),
               StepRecord(False, 1, 1, 0.3)]
    summary = RunSummary.from_run(records, [output(150, 4), output(140, 2)])
    assert summary.decode_token_time_ms == pytest.approx(200.0)
    assert summary.prefill_time_ms == pytest.approx(400.0)
    assert summary.prefill_average_time_ms == pytest.approx(200.0)
    assert summary.e2e_time_ms == pytest.approx(1000.0)
    assert (summary.batch_size, summary.input_seq_len, summary.output_seq_len) == (2, 150, 4)
    assert summary.log_line() == ("Prefill time: 400.00ms, Prefill average time: 200.00ms, "
                                  "Decode token time: 200.00ms, E2E time: 1000.00ms")


def test_a_request_that_failed_in_preprocessing_is_not_counted():
    summary = RunSummary.from_run([StepRecord(True, 1, 100, 0.5)], [output(100, 1), output(0, 0, error="bad file")])
    assert summary.batch_size == 1 and summary.prefill_average_time_ms == pytest.approx(500.0)
    assert summary.decode_token_time_ms == 0.0  # one token: no decode step


def test_csv_has_mindies_ten_columns_in_order_then_the_cache_counts_and_private_modes(tmp_path):
    records = [StepRecord(True, 1, 100, 0.25), StepRecord(False, 1, 1, 0.125), StepRecord(False, 1, 1, 0.0625)]
    path = tmp_path / "new_folder" / "benchmark.csv"
    cached = RequestOutput(1, "", token_ids=[1, 2], prompt_token_count=80, cached_prompt_tokens=64,
                           cached_visual_items=1)
    write_csv(str(path), [RunSummary.from_run(records, [output(100, 3), cached])])
    header, rows = read_csv(path)
    assert header == ["batch_size", "input_seq_len", "output_seq_len", "e2e_time(ms)", "prefill_time(ms)",
                      "decoder_token_time(ms)", "prefill_count", "prefill_token_times", "decode_token_times",
                      "prefill_average_time(ms)", "cached_prompt_tokens", "cached_visual_items"] == list(COLUMNS)
    assert rows == [{"batch_size": "2", "input_seq_len": "100", "output_seq_len": "3", "e2e_time(ms)": "437.50",
                     "prefill_time(ms)": "250.00", "decoder_token_time(ms)": "93.75", "prefill_count": "1",
                     "prefill_token_times": "0.250000", "decode_token_times": "0.125000,0.062500",
                     "prefill_average_time(ms)": "125.00", "cached_prompt_tokens": "64",
                     "cached_visual_items": "1"}]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o7 == 0


def test_the_csv_replaces_an_earlier_benchmark_csv_and_nothing_else(tmp_path):
    summary = RunSummary.from_run([StepRecord(True, 1, 10, 0.1)], [output(10, 1)])
    path = tmp_path / "benchmark.csv"
    write_csv(str(path), [summary, summary])
    write_csv(str(path), [summary])  # an earlier run's CSV: replaced
    assert len(read_csv(path)[1]) == 1 and sorted(os.listdir(tmp_path)) == ["benchmark.csv"]
    precious = tmp_path / "notes.csv"
    precious.write_text("my,own\n1,2\n")
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "nowhere" / "x.csv")
    for target, why in ((precious, "is not a benchmark CSV the kit wrote"), (tmp_path / "dangling.csv",
                                                                             "a link to nothing")):
        with pytest.raises(UserError, match=why):
            write_csv(str(target), [summary])
    assert precious.read_text() == "my,own\n1,2\n" and not (tmp_path / "nowhere").exists()


def test_the_check_before_the_run_makes_no_folder_and_still_refuses_what_cannot_be_written(tmp_path, monkeypatch):
    """The path is checked before the model loads; it made the CSV's folders then, and a run that failed after
    (a damaged checkpoint) left them behind, empty. The write makes them."""
    from atb_models.benchmark.timed_runs import check_csv_path

    monkeypatch.setenv("ATB_LLM_BENCHMARK_ENABLE", "1")
    path = tmp_path / "new" / "deeper" / "benchmark.csv"
    monkeypatch.setenv("ATB_LLM_BENCHMARK_FILEPATH", str(path))
    check_csv_path(performance=False, rank=0)
    assert not (tmp_path / "new").exists()
    write_csv(str(path), [RunSummary.from_run([StepRecord(True, 1, 10, 0.1)], [output(10, 1)])])
    assert len(read_csv(path)[1]) == 1
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setenv("ATB_LLM_BENCHMARK_FILEPATH", str(tmp_path / "afile" / "sub" / "benchmark.csv"))
    with pytest.raises(UserError, match="is not a folder"):
        check_csv_path(performance=False, rank=0)
    assert (tmp_path / "afile").read_text() == "mine"


def test_only_rank_0_writes_the_csv(tmp_path, monkeypatch):
    from atb_models.benchmark.timed_runs import dump_benchmark

    path = tmp_path / "benchmark.csv"
    monkeypatch.setenv("ATB_LLM_BENCHMARK_FILEPATH", str(path))
    summaries = [RunSummary.from_run([StepRecord(True, 1, 10, 0.1)], [output(10, 1)])]
    dump_benchmark(summaries, rank=1)
    assert not path.exists()
    dump_benchmark(summaries, rank=0)
    assert len(read_csv(path)[1]) == 1


# ------------------------------------------------------------------------------------------- run_pa end to end

@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint()


def test_benchmark_env_writes_the_timed_run_with_honest_decode_time(checkpoint, sample_image_path, tmp_path):
    result = run_pa("--model_path", checkpoint, "--input_image", sample_image_path, "--max_batch_size", "3",
                    "--max_output_length", "6", "--ignore_eos", cwd=tmp_path, env={"ATB_LLM_BENCHMARK_ENABLE": "1"})
    assert result.returncode == 0, result.stderr
    assert "warm-up: 1 request" in result.stderr
    assert len(LOG_LINE.findall(result.stderr)) == 1, result.stderr  # the timed run's line, not the warm-up's
    header, rows = read_csv(tmp_path / "benchmark_result" / "benchmark.csv")  # the default path, in the cwd
    assert header == list(COLUMNS)
    [row] = rows  # the three-request run, not the one-request warm-up
    assert (row["batch_size"], row["output_seq_len"], row["prefill_count"]) == ("3", "6", "1")
    prefill = [float(s) for s in row["prefill_token_times"].split(",")]
    decode = [float(s) for s in row["decode_token_times"].split(",")]
    assert len(decode) == 5
    assert float(row["decoder_token_time(ms)"]) == pytest.approx(1000 * sum(decode) / len(decode), abs=0.01)
    assert float(row["e2e_time(ms)"]) == pytest.approx(1000 * (sum(prefill) + sum(decode)), abs=0.01)
    assert float(row["prefill_average_time(ms)"]) == pytest.approx(1000 * sum(prefill) / 3, abs=0.01)
    # The three copies of one prompt are each prefilled, as MindIE times them: none from the prefix cache.
    assert "prefix caching off for the timed copies of one prompt" in result.stderr
    assert (row["cached_prompt_tokens"], row["cached_visual_items"]) == ("0", "0")


def test_the_warm_up_alone_never_writes_the_csv(checkpoint, tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_pa("--model_path", checkpoint, "--dataset_path", dataset, "--results_save_path",
                    tmp_path / "out.json", cwd=tmp_path,
                    env={"ATB_LLM_BENCHMARK_ENABLE": "1", "ATB_LLM_BENCHMARK_FILEPATH": str(tmp_path / "b.csv")})
    assert result.returncode == 1
    assert "warm-up: 1 request" in result.stderr
    assert not (tmp_path / "b.csv").exists()


def test_performance_sweeps_batch_sizes_and_output_lengths_one_row_each(checkpoint, sample_image_path, tmp_path):
    csv_path = tmp_path / "sweep" / "perf.csv"
    result = run_pa("--model_path", checkpoint, "--input_image", sample_image_path, "--performance",
                    "--batch_sizes", "1,3", "--output_lengths", "2,4", cwd=tmp_path,
                    env={"ATB_LLM_BENCHMARK_FILEPATH": str(csv_path)})  # --performance writes without the switch
    assert result.returncode == 0, result.stderr
    _, rows = read_csv(csv_path)
    points = [(int(r["batch_size"]), int(r["output_seq_len"])) for r in rows]
    assert points == [(1, 2), (3, 2), (1, 4), (3, 4)]
    assert [len(r["decode_token_times"].split(",")) for r in rows] == [1, 1, 3, 3]  # eos ignored: full length
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| batch | input len | output len | first token (ms) | per token (ms)")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| 1", "| 3", "| 1", "| 3"]
    assert "Answer[0]" not in result.stdout


def test_a_sweep_leaves_out_batch_sizes_beyond_the_capped_batch(caplog, tmp_path, monkeypatch):
    """--batch_sizes 1,100000000 on an engine whose memory holds 2: no hundred million copies, a warning instead."""
    from atb_models import RequestOutput, SamplingParams, UserError
    from atb_models.benchmark import timed_runs

    class TwoRequestEngine:
        max_batch_size = 2
        step_records = []

        def generate(self, requests, params):
            assert len(requests) <= 2
            return [RequestOutput(i, "", token_ids=[1, 2]) for i in range(len(requests))]

    monkeypatch.setenv("ATB_LLM_BENCHMARK_FILEPATH", str(tmp_path / "perf.csv"))
    monkeypatch.setattr(timed_runs.RunSummary, "from_run", staticmethod(lambda records, outputs: len(outputs)))
    monkeypatch.setattr(timed_runs, "dump_benchmark", lambda summaries, rank, label: None)
    monkeypatch.setattr(timed_runs, "markdown_table", lambda summaries: str(summaries))
    with caplog.at_level("WARNING", logger="atb_models"):
        timed_runs.performance_sweep(TwoRequestEngine(), [{"text": "hi"}], SamplingParams(), [1, 10**8], [2], 0)
    assert any("--batch_sizes 100000000 left out" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="no --batch_sizes value fits"):
        timed_runs.performance_sweep(TwoRequestEngine(), [{"text": "hi"}], SamplingParams(), [3], [2], 0)


def test_sweep_flags_without_performance_are_refused(capsys):
    from examples.models.qwen2_vl.run_pa import main

    assert main(["--batch_sizes", "1,2"]) == 1
    assert capsys.readouterr().err.strip() == "Error: --batch_sizes and --output_lengths go with --performance"


# ------------------------------------------------------------------------------------------------ compare

def test_presets_hold_the_workloads_of_the_issue():
    for name in ("cpu-small", "2b"):
        w = PRESETS[name].workloads
        assert len(w.batch_images) == len(w.batch_tokens) == 16
        assert (w.batch_images[0], w.batch_images[-1]) == ((224, 224), (672, 448))
        assert (min(w.batch_tokens), max(w.batch_tokens)) == (16, 128)
        assert w.decode_batch_sizes == (1, 16)
    assert (PRESETS["cpu-small"].workloads.single_image, PRESETS["cpu-small"].workloads.single_tokens) == \
        ((448, 448), 64)
    assert PRESETS["2b"].workloads.single_tokens == 128
    assert PRESETS["2b"].shape.vocab_size == 151936


def test_decode_floor_is_the_larger_of_weight_reading_and_matrix_work():
    machine = floors.Machine(bandwidth=100e9, matmul_rate=1e12)
    assert floors.decode_floor(10**9, 4, 1, machine) == pytest.approx(0.04)   # 4 GB at 100 GB/s
    assert floors.decode_floor(10**9, 4, 64, machine) == pytest.approx(0.128)  # 128 GFLOP at 1 TFLOP/s


def test_a_run_that_limits_a_library_s_instruction_set_says_so_and_names_the_ones_left_at_the_cpu_s():
    from atb_models.benchmark.compare import isa_limits

    assert isa_limits({}) is None and isa_limits({"ATEN_CPU_CAPABILITY": ""}) is None
    line = isa_limits({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert "ATEN_CPU_CAPABILITY=avx2" in line and "ONEDNN_MAX_CPU_ISA=AVX2" in line
    assert "MKL at the CPU's own ISA (MKL_ENABLE_INSTRUCTIONS unset)" in line
    assert "own ISA" not in isa_limits({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                        "MKL_ENABLE_INSTRUCTIONS": "AVX2"})


def test_each_decode_run_is_held_against_the_floor_of_its_own_moment():
    from atb_models.benchmark.compare import Results
    from atb_models.benchmark.engines import Timing

    results = Results(decode_params=10**9, bytes_per_param=4)  # 4 GB a step
    # Three runs of 80 ms a step, timed while the memory read at 100, 50 and 80 GB/s: floors 40, 80 and 50 ms.
    results.runs[("decode_bs1", "kit")] = [Timing(1.0, 0.1, 0.08, []) for _ in range(3)]
    results.probes[("decode_bs1", "kit")] = [floors.Machine(bw * 1e9, 1e15) for bw in (100, 50, 80)]
    assert results.per_step_vs_floor("decode_bs1", "kit", 1) == pytest.approx(1.6)  # median of 2.0, 1.0, 1.6
    assert results.paired_floor("decode_bs1", 1) == pytest.approx(0.05)


def test_a_bf16_kits_decode_step_is_held_against_the_float32_kits_of_the_same_run():
    from atb_models.benchmark.compare import FLOAT32_KIT, Results, figures
    from atb_models.benchmark.engines import Timing

    results = Results(decode_params=10**9, bytes_per_param=2)
    for mode, step in (("kit", 0.03), (FLOAT32_KIT, 0.06)):
        results.runs[("decode_bs1", mode)] = [Timing(1.0, 0.1, step, []) for _ in range(3)]
        results.probes[("decode_bs1", mode)] = [floors.Machine(20e9, 1e15)] * 3
    out = figures(results, (1,))
    assert out["decode_bf16_vs_fp32[bs1]"] == pytest.approx(0.5)
    assert out["decode_vs_floor[bs1]"] == pytest.approx(0.03 / 0.1)  # 2 GB of bf16 weights at 20 GB/s
    assert not any(name.startswith(("decode_vs_fp32", "top1")) for name in out), "the float32 kit is not quantized"


def test_a_float32_kit_on_bf16_panels_is_held_against_its_own_bytes_and_int8_against_float32_weights():
    from atb_models.benchmark.compare import FLOAT32_KIT, Results, figures
    from atb_models.benchmark.engines import Timing

    # A float32 kit whose linears are bf16 panels (2 GB a step), its float32-weights twin (4 GB), an int8 kit (1 GB).
    results = Results(decode_params=10**9, bytes_per_param=4,
                      decode_bytes={"kit": 2 * 10**9, FLOAT32_KIT: 4 * 10**9, "kit_w8a16": 10**9})
    for mode, step in (("kit", 0.12), (FLOAT32_KIT, 0.24), ("kit_w8a16", 0.06)):
        results.runs[("decode_bs1", mode)] = [Timing(1.0, 0.1, step, []) for _ in range(3)]
        results.probes[("decode_bs1", mode)] = [floors.Machine(20e9, 1e15)] * 3
    out = figures(results, (1,))
    assert out["decode_vs_floor[bs1]"] == pytest.approx(0.12 / 0.1)  # its own 2 GB at 20 GB/s, not 4 GB
    assert out["decode_vs_fp32[bs1]"] == pytest.approx(0.25)  # int8 over float32 weights, not over the bf16 panels
    assert out["decode_vs_floor_w8a16[bs1]"] == pytest.approx(0.06 / 0.05)
    assert "decode_bf16_vs_fp32[bs1]" not in out, "a float32 model: no bf16 figure"
    assert results.quantized_modes == ["kit_w8a16"]


def test_decode_params_leave_out_the_embedding_and_count_the_lm_head(tiny_checkpoint):
    from atb_models.benchmark.engines import LocalReference
    from atb_models.config import load_model_config
    from atb_models.platform import resolve_plan

    model_config = load_model_config(str(tiny_checkpoint()))
    reference = LocalReference(model_config, resolve_plan("cpu", "float32", model_config.torch_dtype))
    model = reference.model
    embedding = model.model.embed_tokens.weight.numel()
    language_model = sum(p.numel() for p in model.model.parameters())
    assert floors.decode_params(reference) == language_model - embedding + model.lm_head.weight.numel()


def test_reference_inputs_left_pad_and_keep_the_images_in_order():
    def prompt(ids, *pixels):
        visuals = [SimpleNamespace(kind="image", pixel_values=p, grid_thw=(1, 2, 2)) for p in pixels]
        return SimpleNamespace(token_ids=ids, visuals=visuals)

    first, second = torch.zeros(4, 3), torch.ones(4, 3)
    inputs = reference_inputs([prompt([5, 6], first), prompt([7, 8, 9], second)], 0, torch.device("cpu"))
    assert inputs["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert inputs["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert torch.equal(inputs["pixel_values"], torch.cat([first, second]))
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2]]
    assert "second_per_grid_ts" not in inputs


def test_reference_inputs_give_videos_seconds_only_to_a_family_that_counts_them():
    def video(seconds):
        return SimpleNamespace(kind="video", pixel_values=torch.zeros(8, 3), grid_thw=(2, 2, 2),
                               seconds_per_grid=seconds)

    prompts = [SimpleNamespace(token_ids=[5], visuals=[video(4.0), video(1.0)]),
               SimpleNamespace(token_ids=[6], visuals=[video(2.0)])]
    assert "second_per_grid_ts" not in reference_inputs(prompts, 0, torch.device("cpu"))  # Qwen2-VL's model refuses it
    inputs = reference_inputs(prompts, 0, torch.device("cpu"), video_seconds=True)
    assert inputs["second_per_grid_ts"].tolist() == [4.0, 1.0, 2.0]
    assert inputs["video_grid_thw"].tolist() == [[2, 2, 2]] * 3


def compare_process(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """`python -m atb_models.benchmark compare --preset tiny FLAGS` run in a fresh kit home."""
    env = {**os.environ, "ATB_MODELS_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-m", "atb_models.benchmark", "compare", "--preset", "tiny", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run_compare_command(tmp_path, *flags: str) -> str:
    """compare_process's output, checked to have succeeded."""
    result = compare_process(tmp_path, *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_compare_runs_end_to_end_and_ends_with_the_four_figures(tmp_path):
    stdout = run_compare_command(tmp_path)
    last = stdout.strip().splitlines()[-4:]
    names = ["speedup_vs_hf[single]", "speedup_vs_hf[batch16]", "decode_vs_floor[bs1]", "decode_vs_floor[bs16]"]
    assert [line.split(": ")[0] for line in last] == names, stdout
    assert all(re.fullmatch(r"\S+: \d+\.\d\d", line) for line in last), last
    assert "single: kit and transformers tokens identical" in stdout  # same tokens, so the same work


@pytest.mark.slow
def test_compare_with_quantize_ends_with_the_three_w8a16_figures(tmp_path):
    stdout = run_compare_command(tmp_path, "--quantize", "w8a16", "--workloads", "single,decode", "--repeats", "1")
    figures = dict(line.split(": ") for line in stdout.strip().splitlines()[-6:])
    assert list(figures)[-3:] == ["decode_vs_fp32[bs1]", "decode_vs_floor_w8a16[bs1]", "top1_agreement_w8a16"]
    assert 0 < float(figures["top1_agreement_w8a16"]) <= 1
    assert "kit_w8a16 per decode step (ms) / the float kit's" in stdout
    # calibrated by the quantize tool, once, beside the preset's checkpoint
    assert "quantized: w8a16 by gptq" in stdout
    assert (tmp_path / "home" / "benchmark" / "tiny" / "checkpoint-w8a16-gptq-v1" / "config.json").is_file()


@pytest.mark.slow
def test_compare_in_bf16_ends_with_the_bf16_step_over_the_float32_one(tmp_path):
    flags = ("--dtype", "bfloat16", "--workloads", "decode", "--repeats", "1")
    if not NATIVE_BF16:  # refused in one line, as --dtype bfloat16 is everywhere on such a CPU
        refused = compare_process(tmp_path, *flags)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert "Error: --dtype bfloat16: this CPU has no native bf16" in refused.stderr
        pytest.skip(NO_NATIVE_BF16)
    stdout = run_compare_command(tmp_path, *flags)
    figures = dict(line.split(": ") for line in stdout.strip().splitlines()[-3:])
    assert list(figures) == ["decode_vs_floor[bs1]", "decode_vs_floor[bs16]", "decode_bf16_vs_fp32[bs1]"]
    assert float(figures["decode_bf16_vs_fp32[bs1]"]) > 0
    assert "(16-bit floats)" in stdout and "kit per decode step (ms) / kit_fp32's" in stdout


def test_a_quantized_models_decode_floor_counts_int8_weights_and_their_scales(tiny_checkpoint):
    from atb_models import LLM

    options = dict(dtype="float32", device="cpu", max_batch_size=1, max_input_length=64, max_output_length=4)
    fp, q = (LLM(str(tiny_checkpoint()), quantize=quantize, **options) for quantize in (None, "w8a16"))
    linears = [p for name, p in q.runner.model.model.named_parameters() if p.dtype == torch.int8]
    scales = [p for name, p in q.runner.model.model.named_parameters() if name.endswith("weight_scale")]
    saved = sum(p.numel() * 3 for p in linears) - sum(p.numel() * 4 for p in scales)  # 4 bytes became 1, plus scales
    assert floors.kit_decode_bytes(fp.runner.model) - floors.kit_decode_bytes(q.runner.model) == saved
    machine = floors.Machine(bandwidth=1e9, matmul_rate=1e15)
    assert floors.decode_floor(1000, 4, 1, machine, weight_bytes=500) == pytest.approx(500 / 1e9)


def test_compare_says_from_which_step_the_kit_s_tokens_part_from_transformers():
    from atb_models.benchmark.compare import first_difference

    assert first_difference([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert first_difference([5, 6], [7, 6]) == 0
    assert first_difference([1, 2], [1, 2, 3]) == 2  # one output longer: from the shorter one's end
