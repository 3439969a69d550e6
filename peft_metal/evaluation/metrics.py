"""Answer metrics, named as lm-evaluation-harness names them: multiple-choice accuracy by three choice rules (`acc`,
`acc_norm`, `acc_per_token`), exact match and token F1 for generated answers, each with its standard error.

The choice rules pick the option whose continuation `template.format_answer(option)` is most likely after the query:

* `acc`: by the summed log-likelihood (lm-eval's `acc`).
* `acc_norm`: by the summed log-likelihood divided by the option's length in characters (lm-eval's `acc_norm`, which
  divides by `len(choice)` of the choice string without the space before it; lm-eval's `acc_bytes` would use UTF-8
  bytes). Results agree with lm-eval's for a task formatted the same way.
* `acc_per_token`: by the mean log-likelihood per token. Meta-training's option loss and the server choose options
  this way, so it stays the headline `score` of a multiple-choice record (results recorded before these names were
  introduced are this number).

`macro_f1` is MetaICL's metric for classification: the options picked by `acc_per_token` (MetaICL too ranks options by
their mean loss per token) against each query's `output`, F1 per label, averaged over every label that is a gold
answer or a prediction (scikit-learn's `f1_score(average="macro")`). It is a property of a whole draw of queries, not a
mean over questions, so its error is taken across seeds' draws (`report.merge_seeds`). With calibration from the
shots (`calibration`), `acc_calibrated` and `macro_f1_calibrated` score the calibrated picks the same way.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, Optional, Sequence

from ..inference import best_option

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


MULTIPLE_CHOICE_METRICS = ("acc", "acc_norm", "acc_per_token")
MACRO_F1 = "macro_f1"
# The same two for the picks calibrated from the shots (`calibration`): accuracy beside `acc_per_token`, whose rule
# they calibrate, and macro-F1. The macro-F1s are properties of a draw (errors across seeds), the rest means.
ACC_CALIBRATED = "acc_calibrated"
MACRO_F1_CALIBRATED = "macro_f1_calibrated"
DRAW_METRICS = (MACRO_F1, MACRO_F1_CALIBRATED)
CALIBRATION_NOTE = "calibration"  # a record's note when calibration from the shots cannot apply to its task
CHOICE_RULE_OF_PREDICTIONS = "acc_per_token"
GENERATIVE_METRICS = ("exact_match", "token_f1")


def choices(options: Sequence[str], sum_logprobs: Sequence[float], mean_logprobs: Sequence[float]) -> dict[str, str]:
    """The option each choice rule picks (see the module docstring for the rules)."""
    # An empty option has no characters to divide by; it is then divided by 1 (lm-eval would divide by 0).
    by_rule = {
        "acc": sum_logprobs,
        "acc_norm": [value / max(len(option), 1) for value, option in zip(sum_logprobs, options)],
        "acc_per_token": mean_logprobs,
    }
    return {name: options[best_option(values)] for name, values in by_rule.items()}


def choice_hits(
    options: Sequence[str], answers: Iterable[str], sum_logprobs: Sequence[float], mean_logprobs: Sequence[float]
) -> dict[str, float]:
    """1.0/0.0 per choice rule: whether the option it picks is an answer."""
    answers = set(answers)
    return {name: float(pick in answers) for name, pick in choices(options, sum_logprobs, mean_logprobs).items()}


def macro_f1(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """The mean over labels (every gold answer and every prediction) of each label's F1; a label never predicted or
    never gold has F1 0 (scikit-learn's `zero_division=0`)."""
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"macro_f1 needs as many predictions as gold answers, at least one: {len(predictions)}, {len(golds)}.")
    scores = []
    for label in dict.fromkeys([*golds, *predictions]):
        true_positives = sum(p == label == g for p, g in zip(predictions, golds))
        predicted, gold = predictions.count(label), golds.count(label)
        scores.append(2 * true_positives / (predicted + gold))  # F1 = 2TP / (2TP + FP + FN)
    return sum(scores) / len(scores)


def mean_stderr(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """The mean of per-example values and its standard error as lm-eval computes it (sample standard deviation over
    sqrt(n)); the error is None for fewer than two values, where lm-eval reports "N/A"."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1) / n)
