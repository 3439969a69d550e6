"""Answer metrics for generated answers: exact match and token F1 (multiple choice is scored by `inference`)."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed.

    An answer made only of punctuation (say "?") would normalize to nothing and then match any empty prediction, so
    such an answer keeps its punctuation (it is only lower-cased and whitespace-collapsed).
    """
    lowered = " ".join(text.lower().split())
    stripped = " ".join(_PUNCTUATION.sub(" ", lowered).split())
    return stripped if stripped or not lowered else lowered


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    """1.0 if the normalized prediction equals any normalized answer."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(answer) for answer in answers))


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Iterable[str]) -> float:
    """The best bag-of-words F1 (over normalized whitespace tokens) of the prediction against any answer."""
    predicted = normalize_answer(prediction).split()
    return max((_f1(predicted, normalize_answer(answer).split()) for answer in answers), default=0.0)
