"""Calibration from the shots: divide out the option prior a context gives, measured on the task's own shots.

A short prompt (or a few demonstrations) can push the LM towards some labels whatever the query says: on MetaICL's
dev tasks the one-pass prompt predicted one label for almost every query of several tasks. Contextual calibration
(Zhao et al. 2021) divides each option's probability by the probability the context gives it on a content-free input;
here the inputs are the task's shots, read as queries after the same context (what a user gives, nothing of the test
queries), and the prior is their mean distribution over the options:

    prior(o) = mean over shots s offering o of P(o | context, s),   pick = argmax_o log P(o | context, x) - log prior(o)

P(o | context, x) is the softmax over the query's options of their mean log-probability per answer token
(`acc_per_token`, the rule whose picks macro-F1 is taken of).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from .answers import best_option

CALIBRATIONS = ("none", "shots")


def option_log_probabilities(mean_logprobs: Sequence[float]) -> list[float]:
    """The log-softmax of the options' mean log-probabilities per token: the LM's distribution over the options."""
    top = max(mean_logprobs)
    log_total = top + math.log(sum(math.exp(value - top) for value in mean_logprobs))
    return [value - log_total for value in mean_logprobs]


def option_prior(shot_scores: Sequence[tuple[Sequence[str], Sequence[float]]]) -> dict[str, float]:
    """Each option's mean probability over the shots that offer it, from (options, mean log-probabilities) per shot."""
    if not shot_scores:
        raise ValueError("Calibration from the shots needs at least one shot with options; got none.")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for options, mean_logprobs in shot_scores:
        for option, log_probability in zip(options, option_log_probabilities(mean_logprobs)):
            sums[option] = sums.get(option, 0.0) + math.exp(log_probability)
            counts[option] = counts.get(option, 0) + 1
    return {option: sums[option] / counts[option] for option in sums}


def calibrated_scores(options: Sequence[str], mean_logprobs: Sequence[float], prior: dict[str, float]) -> list[float]:
    """Each option's log-probability over the options minus the log of its prior. An option no shot offered has no
    prior: the shots cannot calibrate a query that offers it, so that is an error, not a guess."""
    unknown = [option for option in options if option not in prior]
    if unknown:
        raise ValueError(
            f"Options {unknown} are offered by a query but by none of the shots, so the shots give them no prior; "
            f"calibration from the shots needs queries whose options the shots offer (shots offer {sorted(prior)})."
        )
    # A prior that underflowed to 0 (every shot all but excluded the option) is floored at the smallest float.
    return [
        log_p - math.log(max(prior[option], sys.float_info.min))
        for log_p, option in zip(option_log_probabilities(mean_logprobs), options)
    ]


def calibrated_pick(options: Sequence[str], mean_logprobs: Sequence[float], prior: dict[str, float]) -> str:
    """The option with the highest probability divided by its prior."""
    return options[best_option(calibrated_scores(options, mean_logprobs, prior))]

