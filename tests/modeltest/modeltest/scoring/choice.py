"""Which option a VideoBench answer picks, by two rules reported side by side.

`first_letter_choice` is MindIE's rule (the first of A..F found anywhere in the raw output), kept so numbers compare
with MindIE's; it reads "B. A man walks" as A. `strict_choice` reads the answer the way a person would: a leading
option letter, else "answer is X", else the one option whose text the answer states.
"""

from __future__ import annotations

import re

OPTION_LETTERS = "ABCDEF"

# "B", "B.", "(B)", "[B]", "B) a man", "B: a man"; not "A man ..." (an article, not an option).
_LEADING_LETTER = re.compile(r"^[(\[]?([A-F])(?:[)\].:,]|$)")
# "The answer is D", "answer: (C)", "Answer is B."; the letter must stand alone ("answer is A man" is no letter).
_ANSWER_IS = re.compile(r"(?i:\banswer)(?:\s+(?i:is))?\s*[:：]?\s*[(\[]?([A-F])(?![A-Za-z])")
_NON_WORD = re.compile(r"[^\w]+")


def first_letter_choice(output: str) -> str | None:
    """MindIE's rule: the first letter, in the order A..F, that occurs anywhere in the output."""
    for letter in OPTION_LETTERS:
        if letter in output:
            return letter
    return None


def _words(text: str) -> str:
    """Lower case, punctuation as spaces, single spaces: for matching an answer against option texts."""
    return " ".join(_NON_WORD.sub(" ", text.casefold()).split())


def _by_option_text(output: str, choices: dict[str, str]) -> str | None:
    said = _words(output)
    if not said:
        return None
    texts = {letter: _words(text) for letter, text in choices.items() if _words(text)}
    exact = [letter for letter, text in texts.items() if text == said]
    if len(exact) == 1:
        return exact[0]
    padded = f" {said} "
    stated = [letter for letter, text in texts.items() if f" {text} " in padded]
    # An option found only as part of a longer stated option ("man" inside "a woman and a man") does not count.
    stated = [letter for letter in stated
              if not any(other != letter and f" {texts[letter]} " in f" {texts[other]} " for other in stated)]
    return stated[0] if len(stated) == 1 else None


def strict_choice(output: str, choices: dict[str, str]) -> str | None:
    """The option the output picks, or None when it picks none or is ambiguous. `choices` maps letters to texts."""
    text = output.strip()
    for pattern in (_LEADING_LETTER, _ANSWER_IS):
        found = pattern.search(text)
        if found and found.group(1) in choices:
            return found.group(1)
    return _by_option_text(text, choices)
