"""run_pa.sh end to end, as a user runs it: from another directory, on a tiny random checkpoint (and on the bundled
demo reader), in float32.

Each run starts a Python that imports torch and transformers (a few seconds), so the cases are few and short.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atb_models.demo.reader import READER_MODEL_DIR, reader_samples
from atb_models.platform import probe

ROOT = Path(__file__).resolve().parents[1]
RUN_PA_SH = ROOT / "examples" / "models" / "qwen2_vl" / "run_pa.sh"
# One rank on the CPU whatever devices the machine shows; small limits keep each run to seconds.
COMMON_ARGS = ["--world_size", "1", "--device", "cpu", "--dtype", "float32",
               "--max_input_length", "512", "--max_output_length", "8"]


def run_pa(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(RUN_PA_SH), *COMMON_ARGS, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


def assert_answers(stdout: str, count: int) -> None:
    """Question/Answer/Generate lines for requests 0..count-1, then Latency and Throughput."""
    for i in range(count):
        assert f"Question[{i}]: " in stdout
        assert f"Answer[{i}]: " in stdout
        tokens = re.search(rf"^Generate\[{i}\] token num: (\d+)$", stdout, re.MULTILINE)
        assert tokens and 1 <= int(tokens.group(1)) <= 8, stdout
    assert f"Question[{count}]" not in stdout
    assert re.search(r"^Latency\(s\): \d+\.\d+$", stdout, re.MULTILINE), stdout
    assert re.search(r"^Throughput\(tokens/s\): \d+\.\d+$", stdout, re.MULTILINE), stdout


@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint()


# ----------------------------------------------------------------------------------------------- working runs

def test_single_mode_runs_max_batch_size_copies_from_any_directory(checkpoint, sample_image_path, tmp_path):
    shutil.copy(sample_image_path, tmp_path / "cat.jpg")
    result = run_pa("--model_path", checkpoint, "--input_image", "cat.jpg", "--max_batch_size", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_answers(result.stdout, 3)
    # the relative path is read from the caller's directory, and run_pa.sh supplies MindIE's long prompt
    assert "Question[0]: <image: cat.jpg> Explain the contents of the picture with more than 500 words" in result.stdout
    assert not (tmp_path / "results.json").exists()
    assert_no_traceback(result)


def test_several_media_including_a_video_go_into_one_prompt_in_order(checkpoint, sample_image_path,
                                                                       sample_video_path, tmp_path):
    result = run_pa("--model_path", checkpoint, "--input_image", sample_image_path, "--input_image", sample_video_path,
                    "--input_text", "Compare\tthem.", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_answers(result.stdout, 1)
    # control characters of the question are shown as spaces
    assert f"Question[0]: <image: {sample_image_path}> <video: {sample_video_path}> Compare them.\n" in result.stdout


def a_clip_and_a_cat(tmp_path: Path, image: Path, video: Path) -> Path:
    """tmp_path/dataset holding a_clip.mp4 and b_cat.jpg."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    shutil.copy(image, dataset / "b_cat.jpg")
    shutil.copy(video, dataset / "a_clip.mp4")
    return dataset


def test_dataset_mode_writes_sorted_results_and_a_bad_file_fails_only_its_entry(checkpoint, sample_image_path,
                                                                                sample_video_path, tmp_path):
    dataset = a_clip_and_a_cat(tmp_path, sample_image_path, sample_video_path)
    (dataset / "c_notes.txt").write_text("not media")
    (dataset / "d_broken.jpg").write_bytes(b"not a jpeg")
    result = run_pa("--model_path", checkpoint, "--dataset_path", "dataset", "--results_save_path", "out.json",
                    cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    saved = (tmp_path / "out.json").read_text()
    results = json.loads(saved)
    assert list(results) == ["a_clip.mp4", "b_cat.jpg", "c_notes.txt", "d_broken.jpg"]
    assert isinstance(results["a_clip.mp4"], str) and isinstance(results["b_cat.jpg"], str)
    assert set(results["c_notes.txt"]) == {"error"} and set(results["d_broken.jpg"]) == {"error"}
    errors = error_lines(result)
    assert len(errors) == 2 and "c_notes.txt" in errors[0] and "d_broken.jpg" in errors[1], result.stderr
    assert "Question[3]: " in result.stdout and "Answer[2]" not in result.stdout and "Answer[3]" not in result.stdout
    assert "Answer[0]: " in result.stdout and "Answer[1]: " in result.stdout
    assert "Latency(s): " in result.stdout
    assert_no_traceback(result)


def test_num_beams_answers_with_the_best_beam_of_llm_beam_search_at_two_ranks(checkpoint, sample_image_path,
                                                                              sample_video_path, tmp_path):
    from atb_models import LLM, BeamSearchParams

    a_clip_and_a_cat(tmp_path, sample_image_path, sample_video_path)
    result = run_pa("--model_path", checkpoint, "--dataset_path", "dataset", "--results_save_path", "out.json",
                    "--input_text", "Describe it.", "--num_beams", "3", "--length_penalty", "0.5", "--world_size", "2",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", max_input_length=512, max_output_length=8,
              max_batch_size=3)
    expected = llm.beam_search([[{kind: str(path)}, {"text": "Describe it."}] for kind, path in
                                (("video", sample_video_path), ("image", sample_image_path))],
                               BeamSearchParams(3, length_penalty=0.5))
    assert json.loads((tmp_path / "out.json").read_text()) == {"a_clip.mp4": expected[0].text,
                                                              "b_cat.jpg": expected[1].text}
    assert f"Generate[1] token num: {len(expected[1].token_ids)}" in result.stdout
    assert_no_traceback(result)


def test_dataset_mode_fails_only_the_entries_over_limit_mm_per_prompt(checkpoint, sample_image_path,
                                                                     sample_video_path, tmp_path):
    a_clip_and_a_cat(tmp_path, sample_image_path, sample_video_path)
    result = run_pa("--model_path", checkpoint, "--dataset_path", "dataset", "--results_save_path", "out.json",
                    "--limit_mm_per_prompt", "video=0", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["a_clip.mp4"] == {"error": "the request holds 1 video, more than --limit_mm_per_prompt video=0 "
                                              "allows"}
    assert isinstance(results["b_cat.jpg"], str)
    assert error_lines(result) == ["Error: a_clip.mp4: the request holds 1 video, more than --limit_mm_per_prompt "
                                   "video=0 allows"], result.stderr
    assert_no_traceback(result)


def test_without_model_path_the_demo_reader_reads_its_sample_sign(tmp_path):
    """The README's main command: the bundled reader in the dtype this machine picks for it, asked its question."""
    sample = reader_samples()["image"]
    result = run_pa("--dtype", "auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "demo reader" in result.stderr and str(READER_MODEL_DIR) in result.stderr
    assert f"Question[0]: <image: {sample.path}> {sample.question}\n" in result.stdout  # not run_pa.sh's long prompt
    assert f"Answer[0]: {sample.answer}\n" in result.stdout
    assert_answers(result.stdout, 1)


def test_the_demo_reader_is_asked_about_a_clip_what_its_sample_clip_goes_with(tmp_path):
    sample = reader_samples()["video"]
    result = run_pa("--input_image", sample.path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"Answer[0]: {sample.answer}\n" in result.stdout


# -------------------------------------------------------------------------------------------------- bad input

def _unsupported_model_type(tmp_path: Path, checkpoint: Path) -> Path:
    copy = shutil.copytree(checkpoint, tmp_path / "llama_checkpoint")
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "llama"
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def _empty_folder(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


def _only_skipped(tmp_path: Path) -> Path:
    folder = _empty_folder(tmp_path, "skipped_only")
    (folder / ".hidden.jpg").write_bytes(b"x")
    (folder / "sub").mkdir()
    return folder


# case -> (arguments given tmp_path, checkpoint and an image; a text the one Error line must hold)
BAD_INPUTS = {
    "missing_input_image": (lambda t, ckpt, img: ["--input_image", t / "missing.jpg"], "missing.jpg"),
    "unsupported_file_type": (lambda t, ckpt, img: ["--input_image", _file(t, "notes.txt", b"hi")], "notes.txt"),
    "corrupt_image": (lambda t, ckpt, img: ["--input_image", _file(t, "broken.jpg", b"not a jpeg")], "broken.jpg"),
    "corrupt_video": (lambda t, ckpt, img: ["--input_image", _file(t, "broken.mp4", b"not a video")], "broken.mp4"),
    "empty_dataset_folder": (lambda t, ckpt, img: ["--dataset_path", _empty_folder(t, "empty")], "--dataset_path"),
    "a_dataset_folder_of_hidden_files_and_sub_folders": (
        lambda t, ckpt, img: ["--dataset_path", _only_skipped(t)], "only hidden files and sub-folders (2 skipped)"),
    "prompt_longer_than_max_input_length": (
        lambda t, ckpt, img: ["--input_image", img, "--max_input_length", "16"], "--max_input_length 16"),
    "no_input_given": (lambda t, ckpt, img: [], "--input_image"),
    "model_folder_without_config_json": (
        lambda t, ckpt, img: ["--model_path", _empty_folder(t, "no_config"), "--input_image", img], "config.json"),
    "unsupported_model_type": (
        lambda t, ckpt, img: ["--model_path", _unsupported_model_type(t, ckpt), "--input_image", img], "llama"),
    "dtype_the_device_cannot_run": (lambda t, ckpt, img: ["--input_image", img, "--dtype", "float16"], "float16"),
    "a_launcher_flag_that_does_not_parse": (lambda t, ckpt, img: ["--world_size", "abc"], "--world_size"),
    "a_sampling_flag_with_num_beams": (lambda t, ckpt, img: ["--input_image", img, "--num_beams", "2", "--seed", "1"],
                                       "--seed cannot go with it"),
    "a_lone_surrogate_in_the_text": (lambda t, ckpt, img: ["--input_image", img, "--input_text", "caf\udcff"],
                                     "lone surrogate"),  # (a byte that is no UTF-8 in argv)
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_error_line_and_no_traceback(case, checkpoint, sample_image_path, tmp_path):
    if case == "dtype_the_device_cannot_run" and probe("cpu").native_fp16:
        pytest.skip("this CPU runs float16 natively (AVX512-FP16/AMX-FP16), so --dtype float16 is no error here")
    make_args, expected = BAD_INPUTS[case]
    # the case's --model_path, given later, overrides this one
    result = run_pa("--model_path", checkpoint, *make_args(tmp_path, checkpoint, sample_image_path), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = error_lines(result)
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert_no_traceback(result)


def test_debug_shows_the_traceback(tmp_path, sample_image_path):
    result = run_pa("--model_path", _empty_folder(tmp_path, "no_config"), "--input_image", sample_image_path,
                    "--debug", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "UserError" in result.stderr


# ------------------------------------------------------------------------------------------------- fast start

def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`, this checkout first on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


HEAVY = ("torch", "cv2", "transformers.models.qwen2_vl.modeling_qwen2_vl", "atb_models.demo.checkpoint")


def test_import_atb_models_loads_neither_torch_nor_opencv_nor_transformers_modeling_code():
    modules = _modules_after("import atb_models")
    assert not modules & set(HEAVY), modules & set(HEAVY)


def test_run_pa_help_and_the_demo_reader_lookup_load_neither_torch_nor_the_checkpoint_builder():
    modules = _modules_after(
        "from examples.models.qwen2_vl.run_pa import QWEN2_VL\n"
        "from atb_models.cli.run_pa import build_parser\n"
        "build_parser(QWEN2_VL).format_help()\n"
        "from atb_models.demo.reader import reader_samples\n"
        "reader_samples()")
    assert not modules & set(HEAVY), modules & set(HEAVY)
    assert not [name for name in modules if name.startswith("atb_models.engine")]


def test_bad_input_is_refused_before_torch_loads(checkpoint, sample_image_path, sample_video_path, tmp_path):
    """A missing or corrupt file, an empty dataset folder, a model folder without config.json, an engine limit that
    is no positive integer: each is one Error line at once, without waiting for torch, transformers and the
    weights; --cleanup_shm runs without them, and a good run's plan is made without them too (the engine imports
    them next)."""
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "empty").mkdir()
    modules = _modules_after(
        "from examples.models.qwen2_vl.run_pa import QWEN2_VL, main\n"
        "from atb_models.cli.prepare import plan_run\n"
        "from atb_models.cli.run_pa import build_parser\n"
        f"ckpt, image, video, t = {str(checkpoint)!r}, {str(sample_image_path)!r}, {str(sample_video_path)!r}, "
        f"{str(tmp_path)!r}\n"
        "for bad in (['--input_image', t + '/missing.jpg'], ['--input_image', t + '/broken.mp4'],\n"
        "            ['--dataset_path', t + '/empty'], ['--input_image', image, '--model_path', t],\n"
        "            ['--input_image', image, '--max_batch_size', '0']):\n"
        "    assert main(['--model_path', ckpt, *bad]) == 1, bad\n"
        "assert main(['--cleanup_shm', '--shm_name_save_path', t + '/names.txt']) == 0\n"
        "plan = plan_run(build_parser(QWEN2_VL).parse_args(['--model_path', ckpt, '--input_image', video,\n"
        "                                                   '--input_image', image]), QWEN2_VL, 0)\n"
        "assert [list(item) for item in plan.prompt] == [['video'], ['image'], ['text']], plan.prompt\n")
    heavy = {"torch", "transformers.models.qwen2_vl.modeling_qwen2_vl", "atb_models.demo.checkpoint"}
    assert not modules & heavy, modules & heavy
    torch_free = {"atb_models.engine.sampling_params", "atb_models.engine.limits"}
    assert not [name for name in modules if name.startswith("atb_models.engine.") and name not in torch_free]


def test_media_loads_opencv_only_for_a_video(sample_video_path):
    modules = _modules_after("import sys\n"
                             "from atb_models.multimodal.media import probe_media_file\n"
                             "assert 'cv2' not in sys.modules, 'imported with the module'\n"
                             f"probe_media_file({str(sample_video_path)!r})")
    assert "cv2" in modules


def test_run_pa_sh_help_lists_the_launchers_flags_and_run_pas_and_exits_0(tmp_path):
    result = subprocess.run(["bash", str(RUN_PA_SH), "--help"], cwd=tmp_path,
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    for flag in ("--world_size N", "--nnodes N", "--node_rank R", "--master_addr A", "MASTER_PORT",
                 "--model_path DIR", "--input_image PATH", "--performance", "--debug"):
        assert flag in result.stdout, flag
    assert "set -euo" not in result.stdout


@pytest.mark.parametrize("script, own, absent", [
    ("qwen2_vl/run_server.sh", ("OpenAI-compatible server", "--api_key KEY"), ("long answer", "run_pa.py")),
    ("qwen2_5_vl/run_pa.sh", ("Launch Qwen2.5-VL inference", "long answer", "--input_image PATH"), ())])
def test_a_wrapper_scripts_help_is_its_own_then_the_launchers_flags(script, own, absent, tmp_path):
    result = subprocess.run(["bash", str(ROOT / "examples" / "models" / script), "--help"], cwd=tmp_path,
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    for text in (*own, "--world_size N", "--master_addr A", "MASTER_PORT"):
        assert text in result.stdout, text
    for text in absent:
        assert text not in result.stdout, text
