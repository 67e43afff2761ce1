"""run_pa and the launcher under hostile and careless use: no answer lost, nothing waited for, bad input refused
before the model loads, signals and a busy port reported in one line.

Most cases call run_pa's main() in-process. A model folder without config.json shows that a check ran before the
model loads: had loading begun, the error would be about config.json. Real signals and the launcher run as
subprocesses, one each, since their exit status and their ranks are what is tested.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atb_models import RequestOutput, UserError, launch
from atb_models.cli import infer, inputs
from atb_models.cli import results as run_results
from atb_models.cli.entry import Stopped, run_entry_point
from examples.models.qwen2_vl import run_pa
from tests.parity_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
RUN_PA_SH = ROOT / "examples" / "models" / "qwen2_vl" / "run_pa.sh"
CPU_ARGS = ["--device", "cpu", "--dtype", "float32", "--max_input_length", "512"]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error:")]


@pytest.fixture
def no_model(tmp_path) -> Path:
    """A model folder that cannot load (no config.json)."""
    (tmp_path / "no_model").mkdir()
    return tmp_path / "no_model"


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """A model folder that passes the checks made before torch loads (a config.json of a family the kit serves),
    for the tests whose engine is faked and never reads it."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2_vl"}')
    return tmp_path / "model"


@pytest.fixture
def dataset(tmp_path, sample_image_path) -> Path:
    folder = tmp_path / "dataset"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(sample_image_path, folder / name)
    return folder


def run_main(capsys, *args) -> tuple[int, str, str]:
    status = run_pa.main([*CPU_ARGS, *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------------- checked before the model loads

def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "pipe.json")
    return tmp_path / "pipe.json"


UNWRITABLE_RESULTS = {
    "a_folder": (lambda t: t, "is a folder"),
    "empty": (lambda t: "", "is empty"),
    "under_proc": (lambda t: "/proc/results.json", "is under /proc"),
    "dev_full": (lambda t: "/dev/full", "is under /dev"),
    # `--results_save_path /dev/stdout > so.txt` resolves to so.txt: refused as given, before links are followed
    "dev_stdout": (lambda t: "/dev/stdout", "is under /dev"),
    "an_existing_fifo": (_fifo, "not a regular file"),
    "a_missing_folder": (lambda t: t / "missing" / "results.json", "does not exist"),
}


@pytest.mark.parametrize("case", UNWRITABLE_RESULTS)
def test_a_results_path_that_cannot_be_written_is_refused_before_the_model_loads(case, capsys, tmp_path, no_model,
                                                                                 dataset):
    make_path, expected = UNWRITABLE_RESULTS[case]
    status, _, err = run_main(capsys, "--model_path", no_model, "--dataset_path", dataset,
                              "--results_save_path", make_path(tmp_path))
    assert status == 1
    errors = error_lines(err)
    assert len(errors) == 1 and "--results_save_path" in errors[0] and expected in errors[0], err


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top_p", "nan"),
                                         ("--repetition_penalty", "-inf")])
def test_a_non_finite_sampling_flag_is_refused_by_name_before_the_model_loads(flag, value, capsys, no_model,
                                                                              sample_image_path):
    status, _, err = run_main(capsys, "--model_path", no_model, "--input_image", sample_image_path, f"{flag}={value}")
    assert status == 1
    errors = error_lines(err)
    assert len(errors) == 1 and errors[0].startswith(f"Error: {flag} must be a finite number"), err


@pytest.mark.parametrize("flag, value", [("--top_p", "0"), ("--top_k", "-1"), ("--seed", "-1"),
                                         ("--presence_penalty", "3"), ("--num_speculative_tokens", "17"),
                                         ("--prompt_lookup_max", "0")])
def test_a_sampling_flag_out_of_range_is_refused_naming_the_flag(flag, value, capsys, no_model, sample_image_path):
    status, _, err = run_main(capsys, "--model_path", no_model, "--input_image", sample_image_path, flag, value)
    assert status == 1
    errors = error_lines(err)
    assert len(errors) == 1 and errors[0].startswith(f"Error: {flag} must be"), err


# argparse's own refusals (a value off the choices, not a number, a flag it does not know), one line each, exit 1,
# for run_pa and for the other commands built on the same parser
@pytest.mark.parametrize("argv, message", [
    (["--dtype", "bf16"], "Error: argument --dtype: invalid choice: 'bf16'"),
    (["--max_batch_size", "abc"], "Error: argument --max_batch_size: invalid int value: 'abc'"),
    (["--no_such_flag"], "Error: unrecognized arguments: --no_such_flag"),
    (["serve", "--port", "abc"], "Error: argument --port: invalid int value: 'abc'"),
    (["benchmark", "compare", "--preset", "nope"], "Error: argument --preset: invalid choice: 'nope'"),
    (["oracle", "bogus"], "Error: argument command: invalid choice: 'bogus'")])
def test_a_flag_argparse_refuses_is_one_error_line_and_exit_1(argv, message, capsys):
    from atb_models.benchmark import __main__ as benchmark
    from atb_models.oracle import __main__ as oracle_cli
    from atb_models.serve import __main__ as serve

    commands = {"serve": serve.main, "benchmark": benchmark.main, "oracle": oracle_cli.main}
    main = commands.get(argv[0], run_pa.main)
    with pytest.raises(SystemExit) as exit_info:
        main(argv[1:] if argv[0] in commands else argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message) and "--help` lists the flags" in err, err


def test_a_negative_temperature_is_refused_before_the_model_loads(capsys, no_model, sample_image_path):
    status, _, err = run_main(capsys, "--model_path", no_model, "--input_image", sample_image_path,
                              "--temperature", "-1")
    assert status == 1
    errors = error_lines(err)
    assert len(errors) == 1 and "temperature" in errors[0] and "config.json" not in errors[0], err


@pytest.mark.parametrize("name, data", [("missing.jpg", None), ("broken.jpg", b"not a jpeg"),
                                        ("notes.txt", b"hello")])
def test_a_bad_input_image_is_refused_before_the_model_loads(name, data, capsys, tmp_path, no_model):
    if data is not None:
        (tmp_path / name).write_bytes(data)
    status, _, err = run_main(capsys, "--model_path", no_model, "--input_image", tmp_path / name)
    assert status == 1
    errors = error_lines(err)
    assert len(errors) == 1 and name in errors[0] and "config.json" not in errors[0], err


def _read_only_results(tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text('{"old.jpg": "answer"}')
    path.chmod(0o444)  # os.access says root may write it anyway: the mode bits say keep it
    return path


def _link_to_console_output(tmp_path: Path) -> Path:
    """What `--results_save_path /proc/self/fd/1 > so.txt` would name, without /proc: the console's lines."""
    (tmp_path / "so.txt").write_text("Question[0]: <image: a.jpg> What is it?\nAnswer[0]: a cat\n")
    (tmp_path / "link.json").symlink_to(tmp_path / "so.txt")
    return tmp_path / "so.txt"


# case -> (make the file given tmp_path and the dataset folder, returning the file; the path to pass)
FOREIGN_RESULTS = {
    "an_image_of_the_dataset": (lambda t, d: d / "a.jpg", lambda t, d: d / "a.jpg"),
    "a_read_only_results_file": (lambda t, d: _read_only_results(t), lambda t, d: t / "results.json"),
    "a_link_to_a_text_file": (lambda t, d: _link_to_console_output(t), lambda t, d: t / "link.json"),
}


@pytest.mark.parametrize("case", FOREIGN_RESULTS)
def test_a_results_path_naming_a_file_the_kit_did_not_write_is_refused_and_left_untouched(case, capsys, tmp_path,
                                                                                       no_model, dataset):
    make_file, make_path = FOREIGN_RESULTS[case]
    foreign = make_file(tmp_path, dataset)
    before = foreign.read_bytes(), foreign.stat().st_mode
    status, _, err = run_main(capsys, "--model_path", no_model, "--dataset_path", dataset,
                              "--results_save_path", make_path(tmp_path, dataset))
    assert status == 1
    errors = error_lines(err)
    assert len(errors) == 1 and "--results_save_path" in errors[0] and "left untouched" in errors[0], err
    assert "config.json" not in err  # refused before the model loads
    assert (foreign.read_bytes(), foreign.stat().st_mode) == before
    assert not [name for name in os.listdir(foreign.parent) if name.endswith(".tmp")]


# ------------------------------------------------------------------------------ every dataset entry recorded

def test_every_entry_of_a_dataset_folder_is_recorded_with_a_reason_and_a_fifo_is_never_opened(tmp_path,
                                                                                             sample_image_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    shutil.copy(sample_image_path, folder / "good.jpg")
    (folder / "sub").mkdir()
    (folder / ".hidden.jpg").write_bytes(sample_image_path.read_bytes())
    (folder / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "sock.jpg"))
    (folder / "notes.txt").write_text("not media")
    (folder / "link.jpg").symlink_to(folder / "good.jpg")

    # Opening the FIFO would block for ever: fail instead.
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("dataset_entries opened a FIFO"))
    signal.alarm(20)
    try:
        entries = inputs.dataset_entries(str(folder), "What is it?")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

    reasons = {entry.name: (entry.error, entry.skipped) for entry in entries}
    assert list(reasons) == sorted(os.listdir(folder))
    assert reasons["good.jpg"] == (None, None) and reasons["link.jpg"] == (None, None)
    skipped = {".hidden.jpg": "hidden", "sub": "a folder"}
    failed = {"dangling.jpg": "symbolic link to a missing file", "loop.jpg": "symbolic link loop",
              "pipe.jpg": "a FIFO", "sock.jpg": "a socket", "notes.txt": "unsupported file type"}
    for name, reason in skipped.items():
        assert reasons[name][0] is None and reason in reasons[name][1], (name, reasons[name])
    for name, reason in failed.items():
        assert reasons[name][1] is None and reason in reasons[name][0], (name, reasons[name])


def test_a_dataset_run_records_skipped_and_failed_entries_in_the_results_and_exits_1(
        capsys, dataset_run_with_skipped_entries):
    status, out, err, results = dataset_run_with_skipped_entries
    assert status == 1  # the FIFO failed; the sub-folder alone would not fail the run
    assert isinstance(results["a.jpg"], str)
    assert results["sub"] == {"skipped": "a folder (sub-folders are not searched)"}
    assert set(results["pipe.jpg"]) == {"error"}
    assert "Skipped: sub: a folder" in err and "Question[" not in err
    assert len(error_lines(err)) == 1 and "Answer[0]: " in out and "Question[2]" not in out


def test_hidden_files_and_sub_folders_alone_do_not_fail_a_dataset_run(capsys, tiny_checkpoint, tmp_path,
                                                                      sample_image_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    shutil.copy(sample_image_path, folder / "a.jpg")
    (folder / ".DS_Store").write_bytes(b"finder metadata")
    (folder / "sub").mkdir()
    out_path = tmp_path / "results.json"
    status, out, err = run_main(capsys, "--model_path", tiny_checkpoint(), "--dataset_path", folder,
                                "--results_save_path", out_path, "--max_output_length", "4")
    results = json.loads(out_path.read_text())
    assert status == 0 and not error_lines(err), err
    assert set(results) == {"a.jpg", ".DS_Store", "sub"} and isinstance(results["a.jpg"], str)
    assert results[".DS_Store"] == {"skipped": "a hidden file (its name starts with a dot)"}


@pytest.fixture
def dataset_run_with_skipped_entries(capsys, tiny_checkpoint, tmp_path, sample_image_path):
    """A real dataset run of the tiny checkpoint on an image, a sub-folder and a FIFO."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    shutil.copy(sample_image_path, folder / "a.jpg")
    (folder / "sub").mkdir()
    os.mkfifo(folder / "pipe.jpg")
    out_path = tmp_path / "results.json"
    status, out, err = run_main(capsys, "--model_path", tiny_checkpoint(), "--dataset_path", folder,
                                "--results_save_path", out_path, "--max_output_length", "4")
    return status, out, err, json.loads(out_path.read_text())


class AnsweringLLM:
    """Stands in for LLM: answers every request; `during_run()` runs once the first request has finished."""

    during_run = staticmethod(lambda: None)

    def __init__(self, *args, **kwargs):
        self.max_output_length = kwargs["max_output_length"]
        self.step_records = []

    def generate(self, requests, params=None, on_finish=None):
        outputs = [RequestOutput(i, "", text="answer", token_ids=[1]) for i in range(len(requests))]
        for output in outputs if on_finish is not None else []:
            on_finish(output)
            if output.request_id == 0:
                type(self).during_run()
        return outputs


def test_file_names_with_a_line_break_or_esc_cannot_forge_or_colour_a_line(capsys, monkeypatch, tmp_path, fake_model,
                                                                           sample_image_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    shutil.copy(sample_image_path, folder / "\x1b[31mred.jpg")
    (folder / "bad\nError: fake.txt").write_text("not media")
    (folder / "sub\nSkipped: fake\x1b[2J").mkdir()
    monkeypatch.setattr(infer, "LLM", AnsweringLLM)
    out_path = tmp_path / "results.json"
    status, out, err = run_main(capsys, "--model_path", fake_model, "--dataset_path", folder,
                                "--results_save_path", out_path)
    assert status == 1  # the text file failed
    assert "\x1b" not in out + err, err
    errors = error_lines(err)
    assert len(errors) == 1 and errors[0].startswith("Error: bad Error: fake.txt: "), err
    skipped = [line for line in err.splitlines() if line.startswith("Skipped:")]
    assert skipped == ["Skipped: sub Skipped: fake [2J: a folder (sub-folders are not searched)"], err
    assert re.search(r"\[INFO\]  \[31mred\.jpg: answered \(1 of 1\)$", err, re.MULTILINE), err
    assert set(json.loads(out_path.read_text())) == set(os.listdir(folder))  # the results keep the real names


# --------------------------------------------------------------------------------- results written atomically

def _entries(*answers) -> list:
    return [inputs.Entry([], name=f"{i}.jpg", output=RequestOutput(i, "", text=answer))
            for i, answer in enumerate(answers)]


def test_a_failed_results_write_leaves_the_previous_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text('{"old.jpg": "kept"}')

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)  # (outputs.replace_file syncs through it)
    with pytest.raises(UserError, match="No space left on device; the previous file is left as it was"):
        run_results.save_results(_entries("new"), str(path), "results.json")
    assert path.read_text() == '{"old.jpg": "kept"}'
    assert os.listdir(tmp_path) == ["results.json"]


def test_results_replace_the_file_through_a_symbolic_link_keeping_its_mode(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("{}")
    target.chmod(0o640)
    (tmp_path / "link.json").symlink_to(target)
    path = inputs.check_results_path(str(tmp_path / "link.json"))
    run_results.save_results(_entries("yes"), path, "link.json")
    assert json.loads(target.read_text()) == {"0.jpg": "yes"}
    assert (tmp_path / "link.json").is_symlink() and (target.stat().st_mode & 0o777) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


def test_a_previous_results_file_is_replaced(capsys, monkeypatch, tmp_path, fake_model, dataset):
    monkeypatch.setattr(infer, "LLM", AnsweringLLM)
    out_path = tmp_path / "results.json"
    out_path.write_text('{"old.jpg": "an earlier run"}')
    status, _, err = run_main(capsys, "--model_path", fake_model, "--dataset_path", dataset,
                              "--results_save_path", out_path)
    assert status == 0, err
    assert json.loads(out_path.read_text()) == {"a.jpg": "answer", "b.jpg": "answer", "c.jpg": "answer"}


def test_a_json_object_that_is_not_results_is_the_users_and_left_untouched(capsys, tmp_path, fake_model, dataset):
    from atb_models.cli.inputs import Entry, is_results
    from atb_models.cli.results import results_of

    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 896, "architectures": ["Qwen2VLForConditionalGeneration"]}')
    before = config.read_bytes()
    status, _, err = run_main(capsys, "--model_path", fake_model, "--dataset_path", dataset,
                              "--results_save_path", config)
    assert status == 1 and "is not a results file" in err and config.read_bytes() == before
    # what run_pa writes always passes: the check and the writer agree
    entries = [Entry([], "a.jpg", skipped="a hidden file"), Entry([], "b.jpg", error="corrupt")]
    assert is_results(results_of(entries)) and is_results({"c.jpg": "an answer"}) and is_results({})
    assert not is_results({"c.jpg": {"error": "x", "more": 1}}) and not is_results({"c.jpg": 3})


def test_a_results_file_that_became_a_foreign_file_during_the_run_is_left_untouched(capsys, monkeypatch, tmp_path,
                                                                                    fake_model,
                                                                                    dataset):
    out_path = tmp_path / "results.json"
    out_path.write_text('{"old.jpg": "an earlier run"}')
    monkeypatch.setattr(AnsweringLLM, "during_run", staticmethod(lambda: out_path.write_text("my notes\n")))
    monkeypatch.setattr(infer, "LLM", AnsweringLLM)
    status, out, err = run_main(capsys, "--model_path", fake_model, "--dataset_path", dataset,
                                "--results_save_path", out_path)
    assert status == 1 and "Answer[2]: answer" in out
    errors = error_lines(err)
    assert len(errors) == 1 and "is not a results file" in errors[0] and "left untouched" in errors[0], err
    assert out_path.read_text() == "my notes\n"
    assert sorted(os.listdir(tmp_path)) == ["dataset", "model", "results.json"]  # no temporary file left


# ------------------------------------------------------------------------------------- interrupted dataset runs

class InterruptedLLM:
    """Stands in for LLM: the warm-up succeeds; the run finishes its first request, then `interrupt()` runs."""

    interrupt = None

    def __init__(self, *args, **kwargs):
        self.max_output_length = kwargs["max_output_length"]

    def generate(self, requests, params=None, on_finish=None):
        outputs = [RequestOutput(i, "", text="answer", token_ids=[1]) for i in range(len(requests))]
        if on_finish is None:
            return outputs  # the warm-up
        on_finish(outputs[0])
        type(self).interrupt()
        return outputs


STOP_SIGNALS = [(signal.SIGINT, "Interrupted"), (signal.SIGTERM, "Stopped by SIGTERM"),
                (signal.SIGHUP, "Stopped by SIGHUP")]  # SIGHUP: the terminal closed


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """SIGINT raising KeyboardInterrupt, as in a terminal, even where pytest was started in the background of a
    non-interactive shell (which starts it with SIGINT ignored, and Python then installs no handler)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def default_sighup():
    """SIGHUP with its default handler, as in a terminal (not under nohup), whatever pytest was started with."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


def _send_if_handled(signum: int) -> None:
    """`signum` to this process, unless its handler is the default one, which would kill the test run."""
    if signal.getsignal(signum) == signal.SIG_DFL:
        pytest.fail(f"{signal.Signals(signum).name} has its default handler: it would kill the process")
    os.kill(os.getpid(), signum)
    time.sleep(5)  # the signal arrives first


@pytest.mark.parametrize("signum, line", STOP_SIGNALS)
def test_a_signal_in_dataset_mode_writes_the_answers_finished_so_far(signum, line, capsys, monkeypatch, tmp_path,
                                                                     fake_model,
                                                                     dataset, default_sighup):
    monkeypatch.setattr(InterruptedLLM, "interrupt", staticmethod(lambda: _send_if_handled(signum)))
    monkeypatch.setattr(infer, "LLM", InterruptedLLM)
    handler_before = signal.getsignal(signum)
    out_path = tmp_path / "results.json"
    status, _, err = run_main(capsys, "--model_path", fake_model, "--dataset_path", dataset,
                              "--results_save_path", out_path)
    assert status == 128 + signum
    assert json.loads(out_path.read_text()) == {"a.jpg": "answer"}
    assert f"wrote 1 of 3 answers to {out_path} before stopping" in err
    assert err.rstrip().endswith(line) and not error_lines(err), err
    assert signal.getsignal(signum) is handler_before  # main leaves the process as it found it


def test_a_peer_rank_lost_in_dataset_mode_still_writes_the_answers_finished_so_far(capsys, monkeypatch, tmp_path,
                                                                                    fake_model, dataset):
    """At world size 2, rank 1 killed (SIGKILL, out of memory) after rank 0 finished answers: rank 0's collective
    fails (RankLost) and it ended without writing them."""
    from atb_models.errors import RankLost

    def lost():
        raise RankLost("a collective failed: another rank is gone")

    monkeypatch.setattr(InterruptedLLM, "interrupt", staticmethod(lost))
    monkeypatch.setattr(infer, "LLM", InterruptedLLM)
    out_path = tmp_path / "results.json"
    status, _, err = run_main(capsys, "--model_path", fake_model, "--dataset_path", dataset,
                              "--results_save_path", out_path)
    assert status == 1
    assert json.loads(out_path.read_text()) == {"a.jpg": "answer"}
    assert f"wrote 1 of 3 answers to {out_path} before stopping" in err
    assert error_lines(err) == ["Error: a collective failed: another rank is gone"], err


@pytest.mark.parametrize("signum, line", STOP_SIGNALS)
def test_a_signal_during_the_imports_after_the_flags_are_parsed_ends_in_one_line(signum, line, capsys, monkeypatch,
                                                                                 fake_model, sample_image_path,
                                                                                 default_sighup):
    """The run's module (torch, the engine) is imported inside the entry helper, its handlers already in place:
    here the signal arrives as that import starts."""
    import atb_models.cli

    class SignalOnImport:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "atb_models.cli.infer":
                _send_if_handled(signum)
            return None

    monkeypatch.delitem(sys.modules, "atb_models.cli.infer")
    monkeypatch.delattr(atb_models.cli, "infer")
    monkeypatch.setattr(sys, "meta_path", [SignalOnImport(), *sys.meta_path])
    status = run_pa.main(["--model_path", str(fake_model), "--input_image", str(sample_image_path)])
    assert status == 128 + signum
    assert capsys.readouterr().err == line + "\n"


def test_sighup_stays_ignored_under_nohup(capsys):
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert run_entry_point(lambda: 0 if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else 1) == 0
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_signal_before_any_answer_leaves_the_previous_results_file(capsys, monkeypatch, tmp_path, fake_model,
                                                                     dataset):
    def interrupted(self, requests, params=None, on_finish=None):
        if on_finish is None:
            return [RequestOutput(0, "", text="warm", token_ids=[1])]
        raise KeyboardInterrupt

    monkeypatch.setattr(InterruptedLLM, "generate", interrupted)
    monkeypatch.setattr(infer, "LLM", InterruptedLLM)
    out_path = tmp_path / "results.json"
    out_path.write_text('{"old": "run"}')
    status, _, err = run_main(capsys, "--model_path", fake_model, "--dataset_path", dataset,
                              "--results_save_path", out_path)
    assert status == 130
    assert out_path.read_text() == '{"old": "run"}'
    assert "no answer was finished" in err


# ---------------------------------------------------------------------------------------------- warm-up line

def test_a_skipped_warm_up_is_no_error_about_a_request_and_the_run_says_why_once(capsys, tiny_checkpoint,
                                                                                sample_image_path):
    status, _, err = run_main(capsys, "--model_path", tiny_checkpoint(), "--input_image", sample_image_path,
                              "--max_input_length", "16")
    assert status == 1
    warm_up = [line for line in err.splitlines() if "warm-up" in line]
    assert len(warm_up) == 1 and "skipped" in warm_up[0], err
    assert "request" not in warm_up[0] and not re.search(r"\d+ tokens", warm_up[0])
    errors = error_lines(err)
    assert len(errors) == 1 and "request 0" not in errors[0], err
    assert len(re.findall(r"(\d+) tokens", errors[0])) == 1 and "--max_input_length 16" in errors[0]


def test_the_oracle_worker_ends_quietly_on_the_ctrl_c_its_parent_reports():
    """modeltest --backend hf and benchmark compare drive transformers 4.51 in a worker process of the venv; a
    terminal's Ctrl-C reaches it too, and its KeyboardInterrupt traceback (in torch's or transformers' imports, or
    in generate) followed the parent's one `Interrupted` line."""
    from atb_models import oracle

    ours, theirs = socket.socketpair()
    with ours, theirs:
        worker = subprocess.Popen([sys.executable, str(oracle.WORKER), "jobs", "--fd", str(theirs.fileno())],
                                  pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        time.sleep(0.5)  # importing torch, or waiting for a job: either way Ctrl-C must end it in silence
        worker.send_signal(signal.SIGINT)
        out, err = worker.communicate(timeout=60)
    assert worker.returncode == 130 and err == "" and out == "", err


# ------------------------------------------------------------------------------------------------ the launcher

def test_report_exit_status_hands_a_ranks_failed_entries_to_the_launcher(tmp_path, monkeypatch):
    assert launch.report_exit_status(1) == 1  # not launched: the rank's own status
    monkeypatch.setenv(launch.LAUNCHED_ENV, "1")
    monkeypatch.setenv(launch.STATUS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert launch.report_exit_status(0) == 0 and launch._reported_status(str(tmp_path)) == 0
    assert launch.report_exit_status(1) == 0  # torchrun sees a rank that finished
    assert launch._reported_status(str(tmp_path)) == 1  # the launcher exits 1


def test_a_busy_master_port_is_reported_in_one_line_before_ranks_start(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(["bash", str(RUN_PA_SH), "--world_size", "2", "--input_image", "x.jpg"],
                                cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(port)},
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [line for line in result.stderr.splitlines() if line.strip()], result.stderr
    [line] = error_lines(result.stderr)
    assert f"MASTER_PORT {port} is in use" in line
    assert re.search(rf"MASTER_PORT=\d+ bash {re.escape(str(RUN_PA_SH))}", line), line
    assert "rank" not in line


def test_a_rank_signalled_from_outside_is_named_as_the_cause_and_as_stopped(tmp_path):
    """SIGTERM or SIGINT sent to one rank (not to the launcher): the line named the peer's broken collective, or
    said 'its own output above says why' where a rank says nothing of its stop."""
    from types import SimpleNamespace

    from atb_models.distributed import LOST_RANK_MESSAGE

    lost = SimpleNamespace(exitcode=1, message=f"{LOST_RANK_MESSAGE} (gloo: connection closed by peer)",
                           timestamp=100, error_file=str(tmp_path / "rank0_error.json"))
    (tmp_path / "rank0_error.json").write_text("{}")
    for signum in (signal.SIGTERM, signal.SIGINT):
        stopped = SimpleNamespace(exitcode=128 + signum, message="", timestamp=101,
                                  error_file=str(tmp_path / "none.json"))
        rank, failure = launch.first_cause({0: lost, 1: stopped})
        assert rank == 1 and launch._describe(failure) == f"stopped by {signal.Signals(signum).name}"


def test_ctrl_c_before_torchruns_agent_takes_sigint_is_one_line_and_130(monkeypatch, capsys):
    """Ctrl-C in the launcher's first second or two (torch importing, the port being checked) must end as later."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "check_master_port", interrupted)
    try:
        status = launch.main(["--nproc_per_node", "2", "-m", "examples.models.qwen2_vl.run_pa"])
    except KeyboardInterrupt:  # (caught here, so that it fails this test rather than stopping the session)
        pytest.fail("the launcher let Ctrl-C through as a traceback")
    assert status == 130
    assert capsys.readouterr().err == "Interrupted\n"


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _launch(checkpoint: Path, cwd: Path, world_size: int, *args) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(RUN_PA_SH), "--world_size", str(world_size), "--model_path", str(checkpoint), *CPU_ARGS,
         *map(str, args)],
        cwd=cwd, env={**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    """stderr lines up to the first matching `pattern`."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        assert time.monotonic() < deadline, "".join(lines)
    pytest.fail("the run ended before: " + "".join(lines))


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_during_a_dataset_run_writes_the_answers_so_far_and_exits_143(world_size, tiny_checkpoint,
                                                                              tmp_path, dataset):
    """World size 1: run_pa itself; 2: the launcher, which stops its ranks, leaving no process or segment."""
    proc = _launch(tiny_checkpoint(), tmp_path, world_size, "--dataset_path", dataset, "--results_save_path",
                   "out.json", "--max_batch_size", "1", "--max_output_length", "200", "--ignore_eos")
    try:
        early = _wait_for(proc, r"a\.jpg: answered \(1 of 3\)")
        ranks = _children(proc.pid) if world_size > 1 else [proc.pid]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = "".join(early) + err
    assert proc.returncode == 143, err
    written = re.search(r"wrote (\d) of 3 answers to out\.json before stopping", err)
    assert written, err
    results = json.loads((tmp_path / "out.json").read_text())
    assert "a.jpg" in results and len(results) == int(written.group(1)) < 3
    assert err.count("Stopped by SIGTERM") == 1 and "Traceback" not in err and not error_lines(err), err
    assert len(ranks) == world_size and not [pid for pid in ranks if Path(f"/proc/{pid}").exists()]
    assert not [name for name in os.listdir("/dev/shm") if any(name.startswith(f"atbm_{pid}_") for pid in ranks)]


def test_a_dataset_with_a_bad_file_at_world_size_2_ends_like_at_world_size_1(tiny_checkpoint, tmp_path,
                                                                           sample_image_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    shutil.copy(sample_image_path, folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    proc = _launch(tiny_checkpoint(), tmp_path, 2, "--dataset_path", folder, "--results_save_path", "out.json",
                   "--max_output_length", "4")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "Answer[0]: " in out and "Question[1]: " in out and "Latency(s): " in out
    assert error_lines(err) == [line for line in error_lines(err) if line.startswith("Error: b.jpg: ")], err
    assert len(error_lines(err)) == 1 and "rank" not in error_lines(err)[0]
    assert "results of 2 entries (1 answered, 1 failed, 0 skipped) written to out.json" in err
    results = json.loads((tmp_path / "out.json").read_text())
    assert isinstance(results["a.jpg"], str) and set(results["b.jpg"]) == {"error"}


def test_single_mode_makes_as_many_copies_as_the_capped_batch_and_no_more(capsys, monkeypatch, tiny_checkpoint,
                                                                          sample_image_path):
    """--max_batch_size far beyond memory (here, memory for two requests at the limits): the engine caps it, with a
    warning, and single mode makes and runs that many copies, never one per slot asked for (minutes and gigabytes
    before the first line)."""
    from atb_models.engine import llm as llm_module

    made = []

    class CountedEntry(inputs.Entry):
        def __init__(self, *args, **kwargs):
            made.append(1)
            if len(made) > 100:
                raise AssertionError("single mode builds an entry per slot of --max_batch_size")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(inputs, "Entry", CountedEntry)
    monkeypatch.setattr(infer, "Entry", CountedEntry)
    monkeypatch.setattr(llm_module.LLM, "_affordable_blocks", lambda self, one_request: 2 * one_request)
    status, out, err = run_main(capsys, "--model_path", tiny_checkpoint(), "--input_image", sample_image_path,
                                "--max_batch_size", str(10**8), "--max_output_length", "2")
    assert status == 0, err
    assert "Answer[1]: " in out and "Answer[2]: " not in out
    assert len(made) == 2


def test_a_failure_of_one_rank_at_world_size_2_is_one_line_without_the_peers_traceback(tiny_checkpoint, tmp_path,
                                                                                       sample_image_path):
    """Rank 0 refuses a foreign name file while rank 1 waits in a collective: rank 1, stopped by the launcher while
    it lingers, must not print a traceback; the foreign file is left as it was."""
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n")
    proc = _launch(tiny_checkpoint(), tmp_path, 2, "--input_image", sample_image_path, "--shm_name_save_path",
                   foreign, "--max_output_length", "2")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    assert error_lines(err) == [error_lines(err)[0]] and "is not a shared-memory name file" in error_lines(err)[0]
    assert foreign.read_text() == "my notes\n"


# ------------------------------------------------------------------------------------- the entry-point helper

def _raises(error: BaseException):
    def body(*args) -> int:
        raise error
    return body


def test_a_user_error_of_several_lines_ends_an_entry_point_in_one_error_line(capsys):
    assert run_entry_point(_raises(UserError("cannot load the model:\n    config.json: missing\tfield"))) == 1
    assert capsys.readouterr().err == "Error: cannot load the model: config.json: missing field\n"


def test_a_lost_rank_is_one_error_line_and_another_error_keeps_its_traceback(capsys):
    from atb_models.errors import RankLost

    assert run_entry_point(_raises(RankLost("a collective failed"))) == 1
    assert capsys.readouterr().err == "Error: a collective failed\n"
    with pytest.raises(ZeroDivisionError):
        run_entry_point(_raises(ZeroDivisionError("a bug")))


def test_debug_lets_a_user_error_through_with_its_traceback():
    with pytest.raises(UserError, match="bad flag"):
        run_entry_point(_raises(UserError("bad flag")), debug=True)


@pytest.mark.parametrize("signum, line", [(signal.SIGINT, "Interrupted"), (signal.SIGTERM, "Stopped by SIGTERM")])
def test_ctrl_c_exits_130_and_sigterm_143_with_one_line_and_the_handlers_restored(signum, line, capsys):
    handlers_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def body() -> int:
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the signal arrives first
        return 0

    assert run_entry_point(body) == 128 + signum
    assert capsys.readouterr().err == line + "\n"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers_before


@pytest.mark.parametrize("signum, line", [(signal.SIGINT, "Interrupted"), (signal.SIGTERM, "Stopped by SIGTERM")])
def test_a_signal_that_c_code_turns_into_another_exception_still_ends_as_stopped(signum, line, capsys):
    """numpy's C import of datetime turns the KeyboardInterrupt raised inside it into an ImportError; a rank of a
    2-rank run_pa stopped by Ctrl-C at that moment printed that ImportError's traceback."""
    def body() -> int:
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the signal arrives first
        except KeyboardInterrupt as e:
            raise ImportError('PyCapsule_Import could not import module "datetime"') from e
        return 0

    assert run_entry_point(body) == 128 + signum
    assert capsys.readouterr().err == line + "\n"


def test_modeltest_and_the_benchmark_end_through_the_same_helper(capsys, monkeypatch):
    """Each entry point once: modeltest on Ctrl-C (it printed `Interrupted` itself before), the benchmark on a bad
    flag (its error was not one-lined before)."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "modeltest"))
    from modeltest import cli as modeltest_cli
    from modeltest.config import CONFIG_DIR

    from atb_models.benchmark.__main__ import main as benchmark_main

    monkeypatch.setattr(modeltest_cli, "run", _raises(Stopped(signal.SIGTERM)))
    argv = ["--model_config_path", str(CONFIG_DIR / "model" / "qwen2_vl.yaml"),
            "--task_config_path", str(CONFIG_DIR / "task" / "textvqa.yaml")]
    assert modeltest_cli.main(argv) == 143
    assert capsys.readouterr().err == "Stopped by SIGTERM\n"
    assert benchmark_main(["compare", "--preset", "tiny", "--workloads", "nothing"]) == 1
    assert capsys.readouterr().err.startswith("Error: --workloads nothing: choose from ")


def test_benchmark_threads_beyond_four_a_core_are_one_error_line(capsys):
    from atb_models.benchmark.__main__ import main as benchmark_main

    assert benchmark_main(["compare", "--preset", "tiny", "--threads", "100000"]) == 1
    assert capsys.readouterr().err.startswith("Error: --threads must be 1 to ")


@pytest.mark.parametrize("tool", ["bench_chunked_prefill.py", "bench_prefix_cache.py", "bench_speculative.py"])
def test_a_dev_tools_bad_flag_is_one_error_line_and_exit_1(tool):
    """The dev tools parse with the kit's FlagParser: argparse's own ending was its usage and exit 2. (The tools
    that load nothing before parsing; the others end alike, later.)"""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--repeats", "x"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert re.fullmatch(r"Error: argument --repeats: invalid int value: 'x' \(`.*--help` lists the flags\)\n",
                        result.stderr), result.stderr
