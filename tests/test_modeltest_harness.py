"""The modeltest harness end to end, as a user runs it: `bash scripts/mm_run.sh DATASET qwen2_vl ...` from
tests/modeltest, on a tiny random checkpoint in float32, with small TextVQA and VideoBench sets built here.

Each run starts a Python that imports torch and transformers (a few seconds), so every run happens once per module
and the tests read its files. Configuration and dataset errors are checked on the loading functions directly.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from atb_models import LLM, SamplingParams, UserError
from atb_models.demo.checkpoint import make_video

HARNESS_DIR = Path(__file__).resolve().parent / "modeltest"
sys.path.insert(0, str(HARNESS_DIR))

from modeltest.config import CONFIG_DIR, load_model_config, load_task_config  # noqa: E402
from modeltest.scoring.choice import first_letter_choice, strict_choice  # noqa: E402
from modeltest.scoring.vqa import normalize_prediction  # noqa: E402
from modeltest.tasks import make_task  # noqa: E402
from modeltest.tasks.videobench import choice_prompt  # noqa: E402

ROOT = HARNESS_DIR.parents[1]
MM_RUN = HARNESS_DIR / "scripts" / "mm_run.sh"
SUFFIX = " Answer the question using a single word or phrase."
MAX_TOKENS = 8
# One rank on the CPU whatever devices the machine shows; short answers keep each run to seconds.
COMMON_ARGS = ["--world_size", "1", "--device", "cpu", "--dtype", "float32", "--max_output_length", str(MAX_TOKENS)]
CSV_COLUMNS = ["Tasks", "Total", "Failed", "Pass", "Metric", "Value"]
RECORD_KEYS = {"subset", "question_id", "request", "prompt", "answer", "prediction", "gold", "scores",
               "prompt_tokens", "output_tokens", "seconds", "finish_reason", "error", "cached_prompt_tokens",
               "cached_visual_items"}


def mm_run(task: str, *args, output_dir: Path) -> subprocess.CompletedProcess:
    """`bash scripts/mm_run.sh TASK qwen2_vl` from tests/modeltest; flags in `args` win over COMMON_ARGS."""
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HARNESS_DIR), os.environ.get("PYTHONPATH", "")])}
    command = ["bash", str(MM_RUN), task, "qwen2_vl", *COMMON_ARGS, *map(str, args), "--output_dir", str(output_dir)]
    return subprocess.run(command, cwd=HARNESS_DIR, env=env, capture_output=True, text=True, timeout=300)


class Run:
    """One finished mm_run.sh run and the files it wrote."""

    def __init__(self, result: subprocess.CompletedProcess, output_dir: Path, task: str, backend: str, batch: int,
                 world_size: int = 1):
        assert result.returncode == 0, result.stderr
        self.result = result
        [self.date_dir] = output_dir.iterdir()
        sub = Path("CPU", "precision_test", task, "fp32", "qwen2_vl")
        precision = self.date_dir / "modeltest" / "qwen2_vl" / "precision_result"
        stem = f"{task}_{backend}_batch{batch}_tp{world_size}"
        self.result_csv = precision / "results" / sub / f"{stem}_result.csv"
        self.result_txt = precision / "results" / sub / f"{stem}_result.txt"
        [self.outputs_txt] = (precision / "debug" / sub).glob("outputs_*.txt")
        [self.jsonl] = (precision / "debug" / sub).glob(f"{stem}_debug_*.jsonl")

    def csv_rows(self) -> list[dict]:
        with open(self.result_csv, newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == CSV_COLUMNS
            return list(reader)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.jsonl.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- data

def text_image(path: Path, word: str) -> str:
    image = Image.new("RGB", (160, 96), "white")
    ImageDraw.Draw(image).text((30, 40), word, fill="black")
    image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def textvqa_set(tmp_path_factory, checkpoint) -> dict:
    """Four questions: gold answers that agree with the kit's own answer 10 of 10 times (score 1), 2 of 10 times
    (score 0.6) and never (0), and a missing image (a failure). Expected accuracy: 1.6 / 4."""
    folder = tmp_path_factory.mktemp("textvqa")
    images = [text_image(folder / f"sign{i}.png", word) for i, word in enumerate(["STOP", "CAFE", "EXIT"])]
    questions = ["what does the sign say?", "which word is written?", "what is on the board?"]
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", max_batch_size=1, max_input_length=1024,
              max_output_length=MAX_TOKENS)
    requests = [[{"image": image}, {"text": question + SUFFIX}] for image, question in zip(images, questions)]
    outputs = llm.generate(requests, SamplingParams(max_tokens=MAX_TOKENS))
    said = [normalize_prediction(out.text) for out in outputs]
    assert all(said), "the tiny model must say something for this set to mean anything"
    gold = [[said[0]] * 10, [said[1]] * 2 + ["zzz"] * 8, ["zzz"] * 10, ["x"] * 10]
    lines = [{"image": image, "question": question, "question_id": 100 + i}
             for i, (image, question) in enumerate(zip(images, questions))]
    lines.append({"image": str(folder / "missing.png"), "question": "what?", "question_id": 103})
    (folder / "textvqa_val.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    annotations = [{"question_id": 100 + i, "answers": [{"answer": a} for a in answers]}
                   for i, answers in enumerate(gold)]
    (folder / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return {"path": folder / "textvqa_val.jsonl", "said": said}


@pytest.fixture(scope="module")
def videobench_set(tmp_path_factory) -> Path:
    """Eval_QA with two subsets: MSVD (2 and 4 options), TGIF (3 and 6 options, and a missing video); the
    vid_paths are relative to the Video-Bench folder, as in the released set."""
    root = tmp_path_factory.mktemp("Video-Bench")
    (root / "Eval_video").mkdir()
    make_video(root / "Eval_video" / "clip.mp4", num_frames=8, fps=4.0, width=64, height=48)
    eval_qa = root / "Eval_QA"
    (eval_qa / "answer").mkdir(parents=True)
    options = ["a bar slides", "nothing moves", "a dog barks", "it rains", "a car passes", "the light fades"]
    subsets = {"MSVD": [2, 4], "TGIF": [3, 6, 2]}
    answers = {}
    for subset, counts in subsets.items():
        questions = {}
        for j, count in enumerate(counts):
            video = "./Eval_video/missing.mp4" if (subset, j) == ("TGIF", 2) else "./Eval_video/clip.mp4"
            questions[f"{subset}_{j}"] = {"vid_path": video, "question": "What happens in the video?",
                                          "choices": {"ABCDEF"[k]: options[k] for k in range(count)}}
        (eval_qa / f"{subset}_QA_new.json").write_text(json.dumps(questions))
        answers[subset] = {qid: {"answer": "A"} for qid in questions}
    (eval_qa / "answer" / "ANSWER.json").write_text(json.dumps(answers))
    return eval_qa


def run_both_backends(tmp_path_factory, task: str, *args) -> dict:
    """The kit with continuous batching, and transformers one sample at a time, on the same data."""
    runs = {}
    for backend, batch in (("pa", 2), ("hf", 1)):
        out = tmp_path_factory.mktemp(f"{task}_{backend}")
        result = mm_run(task, *args, "--backend", backend, "--batch_size", batch, output_dir=out)
        runs[backend] = Run(result, out, task, backend, batch)
    return runs


@pytest.fixture(scope="module")
def textvqa_runs(tmp_path_factory, checkpoint, textvqa_set) -> dict:
    return run_both_backends(tmp_path_factory, "textvqa", "--model_path", checkpoint,
                             "--dataset_path", textvqa_set["path"])


@pytest.fixture(scope="module")
def videobench_runs(tmp_path_factory, checkpoint, videobench_set) -> dict:
    return run_both_backends(tmp_path_factory, "videobench", "--model_path", checkpoint,
                             "--dataset_path", videobench_set, "--subsets", "MSVD,TGIF")


# ------------------------------------------------------------------------------------------------- TextVQA

def test_textvqa_result_csv_is_the_metric_table(textvqa_runs):
    run = textvqa_runs["pa"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", run.date_dir.name)
    rows = run.csv_rows()
    assert [row["Tasks"] for row in rows] == ["textvqa", "textvqa"]       # overall, then the one subset
    for row in rows:
        assert (row["Total"], row["Failed"], row["Metric"]) == ("4", "1", "acc")
        assert float(row["Pass"]) == pytest.approx(1.6)
        assert float(row["Value"]) == pytest.approx(0.4)
    report = run.result_txt.read_text()
    assert "metric table:" in report and "0.4000" in report
    assert "Metric Table:" in run.result.stdout and "textvqa test result saved to:" in run.result.stdout


def test_textvqa_debug_has_one_record_and_one_output_line_per_sample(textvqa_runs, textvqa_set):
    run = textvqa_runs["pa"]
    records = run.records()
    assert [r["question_id"] for r in records] == [100, 101, 102, 103]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert [r["scores"]["acc"] for r in records] == pytest.approx([1.0, 0.6, 0.0, 0.0])
    assert [r["prediction"] for r in records[:3]] == textvqa_set["said"]
    assert records[0]["prompt"] == "what does the sign say?" + SUFFIX
    assert records[0]["request"][0]["image"].endswith("sign0.png")
    assert len(records[0]["gold"]) == 10
    assert all(1 <= r["output_tokens"] <= MAX_TOKENS and r["prompt_tokens"] > 0 and r["seconds"] > 0
               for r in records[:3])
    assert records[3]["error"].startswith("image file not found") and records[3]["finish_reason"] == "error"

    lines = run.outputs_txt.read_text().splitlines()
    assert len(lines) == 4
    answer, request, seconds = lines[0].split("\t")
    assert answer == str([records[0]["answer"]]) and "sign0.png" in request and float(seconds) > 0
    assert lines[3].split("\t")[3].startswith("error: image file not found")


def test_a_failed_sample_is_reported_and_the_run_goes_on(textvqa_runs):
    assert "1 of 4 samples failed" in textvqa_runs["pa"].result.stderr


def test_textvqa_kit_and_transformers_give_the_same_answers(textvqa_runs):
    kit, reference = textvqa_runs["pa"].records(), textvqa_runs["hf"].records()
    assert [r["answer"] for r in kit] == [r["answer"] for r in reference]
    assert [r["output_tokens"] for r in kit] == [r["output_tokens"] for r in reference]
    assert textvqa_runs["hf"].csv_rows() == textvqa_runs["pa"].csv_rows()


def test_two_ranks_run_under_torchrun_and_rank_zero_alone_writes(tmp_path, checkpoint, textvqa_set, textvqa_runs):
    out = tmp_path / "out"
    result = mm_run("textvqa", "--model_path", checkpoint, "--dataset_path", textvqa_set["path"],
                    "--batch_size", 2, "--world_size", 2, output_dir=out)
    run = Run(result, out, "textvqa", "pa", 2, world_size=2)    # the file names carry the real world size
    assert result.stdout.count("Metric Table:") == 1
    assert len(run.outputs_txt.read_text().splitlines()) == 4
    assert [r["answer"] for r in run.records()] == [r["answer"] for r in textvqa_runs["pa"].records()]


# ---------------------------------------------------------------------------------------------- VideoBench

def test_videobench_reports_both_scores_overall_and_per_subset(videobench_runs):
    run = videobench_runs["pa"]
    rows = run.csv_rows()
    assert [(row["Tasks"], row["Metric"]) for row in rows] == [
        ("videobench", "acc"), ("videobench", "acc_strict"), ("MSVD", "acc"), ("MSVD", "acc_strict"),
        ("TGIF", "acc"), ("TGIF", "acc_strict")]
    assert [(row["Total"], row["Failed"]) for row in rows[::2]] == [("5", "1"), ("2", "0"), ("3", "1")]
    records = run.records()
    for row in rows:
        mine = [r for r in records if row["Tasks"] in ("videobench", r["subset"])]
        passed = sum(r["scores"][row["Metric"]] for r in mine)
        assert float(row["Pass"]) == passed and float(row["Value"]) == pytest.approx(passed / len(mine))
    table = run.result_txt.read_text().split("metric table:")[1]
    [header] = [line for line in table.splitlines() if "Tasks" in line]
    assert "| acc pass " in header and "| acc_strict pass " in header    # side by side


def test_videobench_records_score_each_answer_by_both_rules(videobench_runs, videobench_set):
    records = videobench_runs["pa"].records()
    assert [r["question_id"] for r in records] == ["MSVD_0", "MSVD_1", "TGIF_0", "TGIF_1", "TGIF_2"]
    questions = {**json.loads((videobench_set / "MSVD_QA_new.json").read_text()),
                 **json.loads((videobench_set / "TGIF_QA_new.json").read_text())}
    for r in records[:4]:
        choices = questions[r["question_id"]]["choices"]
        assert r["prompt"] == choice_prompt("What happens in the video?", choices)
        assert r["request"][0]["video"] == str(videobench_set.parent / "Eval_video" / "clip.mp4")
        first, strict = first_letter_choice(r["answer"]), strict_choice(r["answer"], choices)
        assert r["prediction"] == {"first_letter": first, "strict": strict}
        assert r["scores"] == {"acc": float(first == "A"), "acc_strict": float(strict == "A")}
    assert "video file not found" in records[4]["error"]
    assert len(videobench_runs["pa"].outputs_txt.read_text().splitlines()) == 5


def test_videobench_kit_and_transformers_give_the_same_answers(videobench_runs):
    kit, reference = videobench_runs["pa"].records(), videobench_runs["hf"].records()
    assert [r["answer"] for r in kit] == [r["answer"] for r in reference]


@pytest.mark.parametrize("count, ending", [
    (2, " A.o0 B.o1 \n Among the two options A, B above, the one closest to the correct answer is: "),
    (3, " A.o0 B.o1 C.o2 \n Among the three options A, B, C above, the one closest to the correct answer is: "),
    (4, " A.o0 B.o1 C.o2 D.o3 \n Among the four options A, B, C, D above, the one closest to the correct answer "
        "is:"),
    (5, " A.o0 B.o1 C.o2 D.o3 E.o4 \n Among the five options A, B, C, D, E above, the one closest to the correct "
        "answer is: "),
    (6, "Choices: A.o0 B.o1 C.o2 D.o3 E.o4 F.o5 \n Among the six options A, B, C, D, E, F above, the one closest "
        "to the correct answer is:"),
])
def test_videobench_prompt_is_video_benchs_own(count, ending):
    prompt = choice_prompt("Q?", {"ABCDEF"[k]: f"o{k}" for k in range(count)})
    assert prompt == "Q?" + ending + (" Please respond with only the corresponding options and do not provide any "
                                      "explanations or additional information. ASSISTANT:")


# -------------------------------------------------------------------------------------------------- errors

def test_a_rerun_replaces_its_own_result_files_but_never_a_file_a_result_path_links_to(checkpoint, textvqa_set,
                                                                                        tmp_path):
    args = ("--model_path", checkpoint, "--dataset_path", textvqa_set["path"], "--batch_size", "4")
    out = tmp_path / "out"
    first = Run(mm_run("textvqa", *args, output_dir=out), out, "textvqa", "pa", 4)
    before = first.csv_rows()
    assert mm_run("textvqa", *args, output_dir=out).returncode == 0
    assert first.csv_rows() == before
    victim = tmp_path / "victim.csv"
    victim.write_text("mine\n")
    first.result_csv.unlink()
    first.result_csv.symlink_to(victim)
    result = mm_run("textvqa", *args, output_dir=out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is not a file the kit wrote; it is left untouched" in result.stderr.strip().splitlines()[-1]
    assert victim.read_text() == "mine\n"
    assert not [name for name in os.listdir(first.result_csv.parent) if name.endswith(".tmp")]


def test_a_questions_file_that_is_not_utf8_is_one_error_line(checkpoint, tmp_path):
    questions = tmp_path / "textvqa_val.jsonl"
    questions.write_bytes(b'{"image": "a.png", "question": "caf\xe9?", "question_id": 1}\n')
    (tmp_path / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": []}))
    result = mm_run("textvqa", "--model_path", checkpoint, "--dataset_path", questions, output_dir=tmp_path / "o")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("is not UTF-8 text")

@pytest.mark.parametrize("args, message", [
    ([], "arg1: DATASET is required"),
    (["vocalsound"], "Unsupported dataset : vocalsound!"),
    (["textvqa"], "arg2: MODEL_NAME is required"),
    (["textvqa", "llava"], "Unsupported model : llava!"),
    (["textvqa", "qwen2_vl", "--world_size", "0"], "Error: --world_size must be a positive integer, got '0'"),
])
def test_mm_run_refuses_unsupported_arguments_with_the_references_messages(args, message, tmp_path):
    result = subprocess.run(["bash", str(MM_RUN), *args], cwd=HARNESS_DIR, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(message)


def test_a_bad_path_is_one_error_line_without_traceback(checkpoint, tmp_path):
    result = mm_run("textvqa", "--model_path", checkpoint, "--dataset_path", tmp_path / "nowhere.jsonl",
                    output_dir=tmp_path / "out")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == f"Error: dataset path {tmp_path / 'nowhere.jsonl'}: no such file or folder"


def test_the_output_check_before_the_model_loads_makes_no_folder(tmp_path):
    """It made --output_dir then, and a run that failed after (a damaged checkpoint) left it behind, empty."""
    from modeltest.report import check_output_dir

    check_output_dir(str(tmp_path / "new" / "out"))
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(UserError, match="is not a folder"):
        check_output_dir(str(tmp_path / "afile" / "out"))
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_model_yaml_needs_weights_and_rejects_unknown_keys(tmp_path):
    package_yaml = CONFIG_DIR / "model" / "qwen2_vl.yaml"
    with pytest.raises(UserError, match="pass --model_path DIR"):
        load_model_config(str(package_yaml))
    assert load_model_config(str(package_yaml), str(tmp_path)).infer_params.max_output_length == 100
    typo = write(tmp_path / "m.yaml", "model_name: qwen2_vl\nmm_model:\n  infer_params:\n    max_output_lenght: 5\n")
    with pytest.raises(UserError, match="unknown key mm_model.infer_params.max_output_lenght"):
        load_model_config(str(typo), str(tmp_path))
    with pytest.raises(UserError, match="not valid yaml"):
        load_model_config(str(write(tmp_path / "bad.yaml", "model_name: [qwen2_vl\n")), str(tmp_path))
    with pytest.raises(UserError, match="no such folder"):
        load_model_config(str(package_yaml), str(tmp_path / "missing"))


def test_unknown_videobench_subsets_are_errors_not_skipped(tmp_path, videobench_set):
    yaml_path = write(tmp_path / "t.yaml", "task_name: videobench\nsubject_mapping:\n  Foo:\n    name: Foo\n")
    model = load_model_config(str(CONFIG_DIR / "model" / "qwen2_vl.yaml"), str(tmp_path))
    with pytest.raises(UserError, match="'Foo' is not a VideoBench subset"):
        make_task(load_task_config(str(yaml_path), str(videobench_set)), model)
    package_yaml = str(CONFIG_DIR / "task" / "videobench.yaml")
    with pytest.raises(UserError, match="--subsets Bar: not in subject_mapping"):
        load_task_config(package_yaml, str(videobench_set), ["MSVD", "Bar"])
    with pytest.raises(UserError, match="MV questions .*MV_QA_new.json: no such file"):
        make_task(load_task_config(package_yaml, str(videobench_set), ["MV"]), model)


def test_a_videobench_gold_answer_that_is_none_of_the_choices_fails_its_sample(tmp_path, videobench_set):
    """No output could score it: a damaged answer file says so on its sample instead of scoring it wrong."""
    from modeltest.tasks.videobench import VideoBench

    eval_qa = tmp_path / "Eval_QA"
    shutil.copytree(videobench_set, eval_qa)
    answers = json.loads((eval_qa / "answer" / "ANSWER.json").read_text())
    answers["MSVD"]["MSVD_0"] = {"answer": "Z"}
    (eval_qa / "answer" / "ANSWER.json").write_text(json.dumps(answers))
    samples = {sample.question_id: sample for sample in VideoBench._read_subset(eval_qa, "MSVD", answers)}
    assert "'Z' of MSVD_0 in ANSWER.json is none of its choices" in samples["MSVD_0"].error
    assert samples["MSVD_1"].error is None


def test_malformed_textvqa_files_are_errors(tmp_path):
    model = load_model_config(str(CONFIG_DIR / "model" / "qwen2_vl.yaml"), str(tmp_path))
    task_yaml = str(CONFIG_DIR / "task" / "textvqa.yaml")
    questions = write(tmp_path / "textvqa_val.jsonl", '{"image": "a.png", "question": "q?", "question_id": 1}\n')
    with pytest.raises(UserError, match="textvqa_val_annotations.json: no such file"):
        make_task(load_task_config(task_yaml, str(questions)), model)
    write(tmp_path / "textvqa_val_annotations.json", '{"annotations": [{"question_id": 1, "answers": []}]}')
    with pytest.raises(UserError, match="non-empty list of answers"):
        make_task(load_task_config(task_yaml, str(questions)), model)
    write(tmp_path / "textvqa_val_annotations.json",
          '{"annotations": [{"question_id": 1, "answers": [{"answer": "a"}]}]}')
    write(questions, '{"image": "a.png", "question": "q?", "question_id": 1}\n{"image": "b.png"\n')
    with pytest.raises(UserError, match="textvqa_val.jsonl:2: not valid JSON"):
        make_task(load_task_config(task_yaml, str(tmp_path)), model)   # the folder finds textvqa_val.jsonl
