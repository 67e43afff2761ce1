"""The VQA soft accuracy with the answer normalisation of the official VQA evaluator (vqaEval.py), as TextVQA
results are published.

Quirks of the official code are kept on purpose, so scores compare with published ones:
- the prediction is always normalised (punctuation, number words, articles, contractions, lower case), but the
  gold answers only get the punctuation step, and only when the annotators disagree;
- the period rule strips any period not followed by a digit, and at most 32 of them;
- the contraction table holds a few entries that can never match (capitalised keys, looked up after lower-casing).

One deliberate difference: an empty prediction scores 0 (MindIE turns it into "-1", which normalises to "1").
"""

from __future__ import annotations

import re

# Cut a raw generation at the first end-of-text marker a model may print as text.
STOP_STRINGS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<｜eot_id|>", "###",
                "</s>")

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_STRIPPED = 32  # the official code passes re.UNICODE (32) where re.sub takes its count

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(("a", "an", "the"))
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """Each listed mark is deleted when the text has it beside a space (or holds a digit,digit number), else
    replaced by a space; then periods not followed by a digit go."""
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        beside_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if beside_space or delete else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_STRIPPED)


def process_digit_article(text: str) -> str:
    """Lower case; number words to digits; articles dropped; contractions given their apostrophe."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def clean_generation(text: str) -> str:
    """A raw generation cut at the first end-of-text marker, tabs and newlines as spaces, stripped."""
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_prediction(text: str) -> str:
    """The prediction as the official evaluator compares it."""
    return process_digit_article(process_punctuation(clean_generation(text)))


def vqa_accuracy(prediction: str, gold_answers: list[str]) -> float:
    """Mean over the annotators of min(1, matches among the other annotators / 3)."""
    if not gold_answers:
        raise ValueError("vqa_accuracy needs at least one gold answer")
    predicted = normalize_prediction(prediction)
    if not predicted:
        return 0.0
    gold = list(gold_answers)
    if len(set(gold)) > 1:
        gold = [process_punctuation(answer) for answer in gold]
    matches = sum(answer == predicted for answer in gold)
    # Leaving annotator i out removes one match exactly when annotator i agrees with the prediction.
    return sum(min(1.0, (matches - (answer == predicted)) / 3) for answer in gold) / len(gold)
