"""The harness's scorers on hand-made answers: TextVQA's soft accuracy with the official normalisation, and the
two VideoBench option extractions (MindIE's first-letter rule and the strict one)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "modeltest"))

from modeltest.scoring.choice import first_letter_choice, strict_choice  # noqa: E402
from modeltest.scoring.vqa import normalize_prediction, process_punctuation, vqa_accuracy  # noqa: E402


def answers(*groups: tuple[str, int]) -> list[str]:
    """answers(("yes", 3), ("no", 7)) -> ten annotators' answers."""
    return [text for text, count in groups for _ in range(count)]


# ------------------------------------------------------------------------------------------- VQA accuracy

def test_unanimous_match_scores_one_and_a_miss_zero():
    assert vqa_accuracy("stop", answers(("stop", 10))) == 1.0
    assert vqa_accuracy("go", answers(("stop", 10))) == 0.0


@pytest.mark.parametrize("agreeing, expected", [
    (1, 0.3),   # 1 annotator: the 9 others see 1 match each (1/3), the one sees 0
    (2, 0.6),   # 2: the two see 1 match (1/3), the 8 others 2 (2/3) -> (2/3 + 16/3) / 10
    (3, 0.9),   # 3: the three see 2 (2/3), the 7 others 3 (1) -> (2 + 7) / 10
    (4, 1.0),   # 4 or more: every leave-one-out subset holds 3 matches
])
def test_split_answers_give_the_leave_one_out_average(agreeing, expected):
    gold = answers(("cafe", agreeing), ("coffee", 10 - agreeing))
    assert vqa_accuracy("cafe", gold) == pytest.approx(expected)


def test_prediction_is_lowercased_and_stripped_of_punctuation_and_tail_periods():
    assert vqa_accuracy("  Stop!\n", answers(("stop", 10))) == 1.0
    assert vqa_accuracy("Yes.", answers(("yes", 10))) == 1.0
    assert normalize_prediction("mr. smith") == "mr smith"
    assert normalize_prediction("3.5 inches") == "3.5 inches"   # a period before a digit stays


def test_punctuation_beside_a_space_is_deleted_else_replaced_by_a_space():
    assert normalize_prediction("coca-cola") == "coca cola"
    assert normalize_prediction("rock - paper") == "rock paper"
    assert process_punctuation("coca-cola") == "coca cola"
    assert process_punctuation("hi, there") == "hi there"


def test_a_digit_comma_digit_number_loses_its_comma():
    assert normalize_prediction("1,000") == "1000"
    assert vqa_accuracy("1,000", answers(("1000", 10))) == 1.0


def test_articles_are_dropped_from_the_prediction():
    assert normalize_prediction("The Beatles") == "beatles"
    assert normalize_prediction("a dog and an apple") == "dog and apple"
    assert vqa_accuracy("the beatles", answers(("beatles", 10))) == 1.0


def test_number_words_become_digits():
    assert normalize_prediction("Two") == "2"
    assert normalize_prediction("none") == "0"
    assert normalize_prediction("ten cats") == "10 cats"
    assert vqa_accuracy("three", answers(("3", 6), ("4", 4))) == 1.0


def test_contractions_get_their_apostrophe():
    assert normalize_prediction("dont") == "don't"
    assert normalize_prediction("whats up") == "what's up"
    assert vqa_accuracy("wont", answers(("won't", 10))) == 1.0


def test_split_gold_answers_get_the_punctuation_step_only():
    # Not unanimous: "coca-cola" is compared as "coca cola", but "The Shop" keeps its article and capitals.
    gold = answers(("coca-cola", 5), ("The Shop", 5))
    assert vqa_accuracy("Coca-Cola", gold) == 1.0
    assert vqa_accuracy("the shop", gold) == 0.0


def test_unanimous_gold_answers_are_compared_unprocessed_as_the_official_evaluator_does():
    assert vqa_accuracy("coca-cola", answers(("coca-cola", 10))) == 0.0
    assert vqa_accuracy("coca-cola", answers(("coca-cola", 9), ("coke", 1))) == 1.0


def test_generation_is_cut_at_end_markers_and_newlines_become_spaces():
    assert vqa_accuracy("yes<|im_end|>no", answers(("yes", 10))) == 1.0
    assert vqa_accuracy("red ### blue", answers(("red", 10))) == 1.0
    assert normalize_prediction("red\tand\nblue") == "red and blue"


def test_an_empty_prediction_scores_zero():
    assert vqa_accuracy("", answers(("1", 10))) == 0.0
    assert vqa_accuracy(" <|im_end|>", answers(("1", 10))) == 0.0


def test_at_most_32_periods_are_stripped_as_in_the_official_code():
    assert normalize_prediction("." * 40) == "." * 8


# --------------------------------------------------------------------------------------- VideoBench letters

FOUR = {"A": "a man is running", "B": "a dog barks", "C": "it rains", "D": "nothing happens"}


@pytest.mark.parametrize("output, first_letter, strict", [
    ("B. A man is walking", "A", "B"),          # MindIE's rule finds the article's capital A first
    ("(C)", "C", "C"),
    ("The answer is D", "D", "D"),
    ("The answer is (B).", "B", "B"),
    ("Answer: C", "A", "C"),
    ("B", "B", "B"),
    ("D) nothing happens", "D", "D"),
    ("A dog barks.", "A", "B"),                 # no option letter: the option's text decides
    ("It rains", None, "C"),
    ("a dog barks and a man is running", None, None),   # two options stated: no choice
    ("E", "E", None),                           # not one of the four options
    ("", None, None),
])
def test_first_letter_and_strict_extraction(output, first_letter, strict):
    assert first_letter_choice(output) == first_letter
    assert strict_choice(output, FOUR) == strict


def test_an_option_inside_a_longer_stated_option_does_not_count():
    choices = {"A": "man", "B": "a woman and a man"}
    assert strict_choice("I see a woman and a man walking", choices) == "B"
    assert strict_choice("a man", choices) == "A"
