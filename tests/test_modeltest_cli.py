"""The harness's command lines as a user meets them: help that says what is required, one error line for a model
folder transformers cannot load, no code run from a model folder; and tools/measure_load_memory.py's arguments."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS_DIR = ROOT / "tests" / "modeltest"
MM_RUN = HARNESS_DIR / "scripts" / "mm_run.sh"
sys.path.insert(0, str(HARNESS_DIR))

from modeltest import cli  # noqa: E402
from modeltest.config import CONFIG_DIR  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

# transformers' handler takes the stderr of the moment it is made: made now, the session's, not a test's captured
# stream that closes after it (cli imports transformers only when it runs).
transformers_logging.get_logger("transformers")


@pytest.fixture
def restore_loggers():
    """cli.run configures the harness's logger and transformers' verbosity for a console; put them back."""
    from transformers.utils import logging as transformers_logging

    harness_logger = logging.getLogger("modeltest")
    saved = harness_logger.handlers[:], harness_logger.level, harness_logger.propagate
    verbosity = transformers_logging.get_verbosity()
    yield
    harness_logger.handlers[:], harness_logger.level, harness_logger.propagate = saved
    transformers_logging.set_verbosity(verbosity)


def yaml_args(task: str = "textvqa") -> list[str]:
    return ["--model_config_path", str(CONFIG_DIR / "model" / "qwen2_vl.yaml"),
            "--task_config_path", str(CONFIG_DIR / "task" / f"{task}.yaml")]


def test_the_harness_module_and_its_help_load_neither_torch_nor_transformers():
    """They load inside the entry point, whose handlers turn Ctrl-C into `Interrupted`: imported with the module, a
    Ctrl-C in mm_run.sh's first second or two was a KeyboardInterrupt traceback, and --help waited for them."""
    code = ("import sys\nfrom modeltest.cli import build_parser\nbuild_parser().format_help()\n"
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=HARNESS_DIR, capture_output=True, text=True,
                            timeout=120, env={**os.environ,
                                              "PYTHONPATH": f"{HARNESS_DIR}:{ROOT}"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_mm_run_help_prints_its_usage_and_exits_0(flag):
    result = subprocess.run(["bash", str(MM_RUN), flag], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    assert "bash scripts/mm_run.sh DATASET MODEL" in result.stdout
    assert "DATASET: textvqa | videobench; MODEL: qwen2_vl" in result.stdout
    assert "--world_size N" in result.stdout and "set -euo" not in result.stdout


def test_modeltest_help_marks_only_the_two_yaml_paths_required_and_lists_world_size(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    required = help_text.split("\nrequired:\n")[1]
    assert [line.split()[0] for line in required.splitlines() if line.startswith("  --")] == [
        "--model_config_path", "--task_config_path"]
    options = help_text.split("\noptions:\n")[1].split("\nrequired:\n")[0]
    assert "--model_config_path" not in options and "--world_size N" in options


def test_world_size_above_1_starts_the_ranks_through_the_kits_launcher(monkeypatch):
    import atb_models.launch

    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv(atb_models.launch.LAUNCHED_ENV, raising=False)
    started = []
    monkeypatch.setattr(atb_models.launch, "main", lambda argv: started.append(argv) or 7)
    argv = [*yaml_args(), "--world_size", "2", "--batch_size", "2"]
    assert cli.main(argv) == 7  # the launcher's exit status
    assert started == [["--nproc_per_node", "2", "--master_port", "20050", "-m", "modeltest", *argv]]


@pytest.mark.parametrize("world_size, message", [
    ("0", "Error: --world_size must be a positive integer, got 0"),
    ("3", "Error: --world_size 3, but this process is one of 2 ranks"),
])
def test_a_world_size_that_cannot_be_is_one_error_line(monkeypatch, capsys, restore_loggers, world_size, message):
    import atb_models.launch

    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank the launcher started
    monkeypatch.setenv(atb_models.launch.LAUNCHED_ENV, "1")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert cli.main([*yaml_args(), "--world_size", world_size]) == 1
    assert capsys.readouterr().err.strip() == message


def small_textvqa(folder: Path) -> Path:
    """One TextVQA question; the run never gets as far as its image."""
    (folder / "textvqa_val.jsonl").write_text(json.dumps({"image": "a.png", "question": "q?", "question_id": 1}) + "\n")
    (folder / "textvqa_val_annotations.json").write_text(
        json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "a"}]}]}))
    return folder / "textvqa_val.jsonl"


@pytest.mark.parametrize("weights", ["none", "pickle_only"])
def test_hf_backend_on_a_folder_without_safetensors_is_one_error_line(tiny_checkpoint, tmp_path, capsys,
                                                                      restore_loggers, weights):
    model = shutil.copytree(tiny_checkpoint(), tmp_path / "model")
    for path in model.glob("*.safetensors*"):
        path.unlink()
    if weights == "pickle_only":  # a pickle is never unpickled: code could run
        (model / "pytorch_model.bin").write_bytes(b"\x80\x04not a checkpoint")
    argv = [*yaml_args(), "--model_path", str(model), "--dataset_path", str(small_textvqa(tmp_path)),
            "--backend", "hf", "--device", "cpu", "--dtype", "float32", "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"Error: --backend hf: cannot load the model from {model}: ")
    assert "safetensors" in err[-1] and not any("Traceback" in line for line in err)


def from_pretrained_calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
            yield node


def test_every_transformers_load_in_the_kit_the_harness_and_tools_refuses_code_from_the_model_folder():
    files = [*sorted((HARNESS_DIR / "modeltest").rglob("*.py")), *sorted((ROOT / "tools").glob("*.py")),
             *sorted((ROOT / "atb_models").rglob("*.py"))]
    calls = [(path, call) for path in files for call in from_pretrained_calls(path)]
    assert len(calls) >= 3  # the kit's config, tokenizer, image processor and reference loads, train_reader's
    for path, call in calls:
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        value = keywords.get("trust_remote_code")
        assert isinstance(value, ast.Constant) and value.value is False, f"{path.name}:{call.lineno}"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_load_memory_has_a_help_that_names_its_arguments(capsys):
    tool = load_tool("measure_load_memory")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "[-h] MODEL_DIR [DTYPE]" in help_text
    assert "checkpoint folder" in help_text and "auto, bfloat16, float16, float32" in help_text
    for bad in (["model", "int8"], [], ["--model_path", "model"]):  # one Error line and exit 1, as everywhere
        with pytest.raises(SystemExit) as exit_info:
            tool.main(bad)
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("Error: ") and err.count("\n") == 1, err


def test_measure_load_memory_still_measures_a_load(tiny_checkpoint, capsys):
    tool = load_tool("measure_load_memory")
    assert tool.main([str(tiny_checkpoint()), "float32"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("rank 0: parameters held ") and "private memory peak +" in line
    assert tool.main([str(tiny_checkpoint().parent / "missing")]) == 1
    assert capsys.readouterr().err.startswith("Error: ")


@pytest.mark.parametrize("value", [",", "MSVD,", ""])
def test_subsets_with_an_empty_key_are_refused_not_taken_for_every_subset(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([*yaml_args(), "--subsets", value])
    assert exit_info.value.code == 1 and "none empty" in capsys.readouterr().err
