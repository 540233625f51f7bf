"""The standard answer metrics: exact match after normalisation, ANLS, and option-letter parsing.

Every metric scores one prediction against one or more gold answers and returns a number in [0, 1]; the best
gold counts (VQA and DocVQA give several answers per question). Definitions: docs/evaluation.md.
"""

from __future__ import annotations

import re
import string

ANLS_THRESHOLD = 0.5
LETTERS = string.ascii_uppercase
ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_DECIMAL_OR_THOUSANDS = re.compile(r"(?<=\d)[.,](?=\d)")  # "3.5" and "1,000" keep their digits together


def normalize_answer(text: str) -> str:
    """VQA-style: lowercase, punctuation and articles removed, number words as digits, spaces collapsed."""
    text = _DECIMAL_OR_THOUSANDS.sub(lambda m: "\0" if m.group(0) == "." else "", str(text).lower())
    text = _PUNCTUATION.sub(" ", text).replace("\0", ".")
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in golds))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), two rows of memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(str(text).lower().split())  # the DocVQA rule: case and spacing do not count, the rest does


def anls(prediction: str, golds: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one answer: max over golds of 1 - NL, or 0 when NL >= 0.5.

    NL = levenshtein(gold, pred) / max(len(gold), len(pred)); two empty strings are identical (NL = 0).
    """
    predicted, best = _anls_text(prediction), 0.0
    for gold in golds:
        gold = _anls_text(gold)
        longest = max(len(gold), len(predicted))
        distance = levenshtein(gold, predicted) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


_PATTERNS = (
    re.compile(r"^\s*\(?([A-Z])\)?\s*(?:[.:)]|$)"),  # "B", "(B)", "B.", "B)", "B: text"
    re.compile(r"^\s*\(([A-Z])\)"),  # "(B) text"
    re.compile(r"answer\s*(?:is|:)?\s*(?:option\s*)?[:\s]*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"\(([A-Z])\)"),  # "... (B) ..." anywhere
)


def parse_choice(text: str, options: list[str]) -> str | None:
    """The option letter a free-form reply picks, or None.

    Tried in order: a leading letter ("B", "(B)", "B.", "B) cat"), "the answer is B", a letter in parentheses,
    the text of exactly one option (an option inside a longer named one does not count), a single capital
    letter standing alone in the reply. Letters beyond the options are ignored.
    """
    valid = LETTERS[: len(options)]
    for pattern in _PATTERNS:
        match = pattern.search(text)
        if match and match.group(1).upper() in valid:
            return match.group(1).upper()
    reply = f" {normalize_answer(text)} "
    named = {
        letter: norm
        for letter, option in zip(valid, options)
        if (norm := normalize_answer(option)) and f" {norm} " in reply
    }
    # An option named only as part of a longer named option ("green" in "dark green") is not named itself.
    named = [
        letter
        for letter, norm in named.items()
        if not any(f" {norm} " in f" {other} " and other != norm for other in named.values())
    ]
    if len(named) == 1:
        return named[0]
    alone = set(re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text)) & set(valid)
    return alone.pop() if len(alone) == 1 else None


def choice_score(prediction: str | None, gold: str) -> float:
    return float(prediction is not None and prediction == gold)


METRICS = ("exact", "anls", "choice")
