"""VideoBench (PKU-YuanGroup Video-Bench) in its Eval_QA layout: `<Subset>_QA_new.json` ({question_id: {vid_path,
question, choices: {"A": text, ...}}}) and `answer/ANSWER.json` ({subset: {question_id: {"answer": letter}}}).
Relative vid_paths are read from the Video-Bench folder, the parent of Eval_QA."""

from __future__ import annotations

from pathlib import Path

from atb_models import UserError

from modeltest.config import ModelConfig, TaskConfig
from modeltest.scoring.choice import OPTION_LETTERS, first_letter_choice, strict_choice
from modeltest.tasks.base import Sample, Score, Subset, Task, media_path, read_json

SUBSETS = ("ActivityNet", "Driving-decision-making", "Driving-exam", "MOT", "MSRVTT", "MSVD", "MV", "NBA", "SQA3D",
           "TGIF", "TVQA", "Ucfcrime", "Youcook2", "sampling_data")
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
ANSWER_INSTRUCTION = (" Please respond with only the corresponding options and do not provide any explanations or "
                      "additional information. ASSISTANT:")


def questions_file(eval_qa: Path, subset: str) -> Path:
    return eval_qa / ("sampling_datasets_QA_new.json" if subset == "sampling_data" else f"{subset}_QA_new.json")


def choice_prompt(question: str, choices: dict) -> str:
    """Video-Bench's own prompt, spacing included: six options get "Choices:", and the line after the options
    ends with a space for two, three and five options."""
    letters = OPTION_LETTERS[:len(choices)]
    options = " ".join(f"{letter}.{choices[letter]}" for letter in letters)
    count = len(letters)
    closing = (f" \n Among the {_COUNT_WORDS[count]} options {', '.join(letters)} above, the one closest to the "
               "correct answer is:" + (" " if count in (2, 3, 5) else ""))
    return question + ("Choices: " if count == 6 else " ") + options + closing + ANSWER_INSTRUCTION


def _choices_problem(choices: dict) -> str | None:
    letters = OPTION_LETTERS[:len(choices)]
    if not 2 <= len(choices) <= 6 or sorted(choices) != list(letters):
        return f"choices must be 2 to 6 options lettered from A, got {sorted(choices)}"
    if not all(isinstance(text, str) for text in choices.values()):
        return "every choice must be a string"
    return None


class VideoBench(Task):
    name = "videobench"
    metrics = {"acc": "MindIE's rule: the first of A..F found anywhere in the answer is the choice",
               "acc_strict": "a leading option letter, else 'answer is X', else the one option whose text the "
                             "answer states"}

    def __init__(self, config: TaskConfig, model: ModelConfig):
        eval_qa = Path(config.local_dataset_path)
        if not eval_qa.is_dir():
            raise UserError(f"VideoBench dataset path {eval_qa}: expected the Eval_QA folder")
        unknown = [key for key in config.subject_mapping if key not in SUBSETS]
        if unknown:
            raise UserError(f"subject_mapping key {unknown[0]!r} is not a VideoBench subset "
                            f"(known: {', '.join(SUBSETS)})")
        answers = read_json(eval_qa / "answer" / "ANSWER.json", "VideoBench answers")
        if not isinstance(answers, dict):
            raise UserError(f"VideoBench answers {eval_qa / 'answer' / 'ANSWER.json'}: expected "
                            "{subset: {question_id: {\"answer\": letter}}}")
        subsets = [Subset(key, name, self._read_subset(eval_qa, key, answers))
                   for key, name in config.subject_mapping.items()]
        super().__init__(subsets)

    @staticmethod
    def _read_subset(eval_qa: Path, key: str, answers: dict) -> list[Sample]:
        path = questions_file(eval_qa, key)
        questions = read_json(path, f"VideoBench {key} questions")
        gold = answers.get(key)
        if not isinstance(questions, dict) or not questions:
            raise UserError(f"VideoBench {key} questions {path}: expected a non-empty {{question_id: {{...}}}}")
        if not isinstance(gold, dict):
            raise UserError(f"VideoBench answers {eval_qa / 'answer' / 'ANSWER.json'}: no answers for {key}")
        samples = []
        for question_id, item in questions.items():
            if not (isinstance(item, dict) and isinstance(item.get("vid_path"), str)
                    and isinstance(item.get("question"), str) and isinstance(item.get("choices"), dict)):
                raise UserError(f"VideoBench {key} questions {path}: {question_id} needs vid_path (str), "
                                "question (str) and choices ({letter: text})")
            choices = item["choices"]
            problem = _choices_problem(choices)
            answer = gold.get(question_id, {})
            letter = answer.get("answer") if isinstance(answer, dict) else None
            if problem is None and letter is None:
                problem = f"no answer for {question_id} in ANSWER.json"
            elif problem is None and letter not in choices:  # (no output could match it: a damaged answer file)
                problem = f"the answer {letter!r} of {question_id} in ANSWER.json is none of its choices"
            prompt = item["question"] if problem else choice_prompt(item["question"], choices)
            request = [{"video": media_path(item["vid_path"], eval_qa.parent)}, {"text": prompt}]
            samples.append(Sample(question_id, request, letter, choices, problem))
        return samples

    def score(self, sample: Sample, output: str) -> Score:
        first, strict = first_letter_choice(output), strict_choice(output, sample.choices)
        return Score({"acc": float(first == sample.gold), "acc_strict": float(strict == sample.gold)},
                     {"first_letter": first, "strict": strict})
