"""TextVQA in MindIE's layout: `textvqa_val.jsonl` (one question a line: image, question, question_id) beside
`textvqa_val_annotations.json` ({"annotations": [{"question_id", "answers": [{"answer"}, ...]}]})."""

from __future__ import annotations

import json
from pathlib import Path

from atb_models import UserError

from modeltest.config import ModelConfig, TaskConfig
from modeltest.scoring.vqa import normalize_prediction, vqa_accuracy
from modeltest.tasks.base import Sample, Score, Subset, Task, media_path, read_json

DEFAULT_FILE = "textvqa_val.jsonl"


def annotation_path(questions: Path) -> Path:
    """textvqa_val.jsonl -> textvqa_val_annotations.json, in the same folder."""
    return questions.with_name(questions.stem + "_annotations.json")


def read_annotations(path: Path) -> dict:
    """question_id (as a string) -> the annotators' answers."""
    data = read_json(path, "TextVQA annotations")
    entries = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise UserError(f"TextVQA annotations {path}: expected {{\"annotations\": [...]}}")
    answers = {}
    for number, entry in enumerate(entries):
        given = entry.get("answers") if isinstance(entry, dict) else None
        if (not isinstance(given, list) or not given or "question_id" not in entry
                or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in given)):
            raise UserError(f"TextVQA annotations {path}: entry {number} needs a question_id and a non-empty list "
                            "of answers, each {\"answer\": str}")
        answers[str(entry["question_id"])] = [a["answer"] for a in given]
    return answers


def _question(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON: {e}") from None
    if not (isinstance(record, dict) and isinstance(record.get("image"), str)
            and isinstance(record.get("question"), str) and isinstance(record.get("question_id"), (int, str))):
        raise UserError(f"{where}: expected an object with image (str), question (str), question_id")
    return record


class TextVQA(Task):
    name = "textvqa"
    metrics = {"acc": "VQA soft accuracy: min(1, other annotators agreeing / 3) averaged over the annotators, "
                      "with the official answer normalisation"}

    def __init__(self, config: TaskConfig, model: ModelConfig):
        if len(config.subject_mapping) != 1:
            raise UserError(f"textvqa has one subset (the whole file); subject_mapping names "
                            f"{len(config.subject_mapping)}")
        [(key, name)] = config.subject_mapping.items()
        questions = Path(config.local_dataset_path)
        if questions.is_dir():
            questions = questions / DEFAULT_FILE
        answers = read_annotations(annotation_path(questions))
        try:
            lines = questions.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UserError(f"TextVQA questions {questions}: cannot read: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"TextVQA questions {questions}: byte {e.start} is not UTF-8 text") from None
        samples, seen = [], set()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = _question(line, f"{questions}:{number}")
            question_id = record["question_id"]
            if str(question_id) in seen:
                raise UserError(f"{questions}:{number}: question_id {question_id!r} appears twice")
            seen.add(str(question_id))
            text = model.prompt_prefix + record["question"] + model.prompt_suffix
            gold = answers.get(str(question_id))
            samples.append(Sample(question_id, [{"image": media_path(record["image"], questions.parent)},
                                                {"text": text}], gold,
                                  error=None if gold else f"no annotation for question_id {question_id!r}"))
        if not samples:
            raise UserError(f"TextVQA questions {questions}: no questions")
        super().__init__([Subset(key, name, samples)])

    def score(self, sample: Sample, output: str) -> Score:
        return Score({"acc": vqa_accuracy(output, sample.gold)}, normalize_prediction(output))
