"""Calibration from the shots: the option prior read on the shots is divided out of each query's pick, and the
runner reports the calibrated accuracy and macro-F1 beside the usual metrics."""

from __future__ import annotations

import math

import pytest
from conftest import make_pgm

from peft_metal.data import Example, Task
from peft_metal.evaluation import EvaluationSettings, evaluate
from peft_metal.evaluation.metrics import macro_f1
from peft_metal.evaluation.report import markdown_table, merge_seeds
from peft_metal.inference.calibration import calibrated_pick, option_log_probabilities, option_prior

pytestmark = pytest.mark.one_thread  # tiny models (conftest)

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st"]


def test_option_log_probabilities_are_the_softmax_over_the_options():
    values = option_log_probabilities([-1.0, -2.0, -4.0])
    assert sum(math.exp(v) for v in values) == pytest.approx(1.0)
    assert values[0] - values[1] == pytest.approx(1.0)
    assert option_log_probabilities([-2000.0, -1.0])[0] == pytest.approx(-1999.0)  # no underflow to log(0)


def test_the_prior_is_each_options_mean_probability_over_the_shots_that_offer_it():
    log = math.log
    prior = option_prior([(("a", "b"), [log(0.9), log(0.1)]), (("a", "b"), [log(0.5), log(0.5)]), (("a", "c"), [0.0, 0.0])])
    assert prior == pytest.approx({"a": (0.9 + 0.5 + 0.5) / 3, "b": 0.3, "c": 0.5})
    with pytest.raises(ValueError, match="at least one shot"):
        option_prior([])


def test_a_pick_the_prior_explains_is_turned_over():
    """The LM prefers `a` on every input by the same margin, the shots say: a query it prefers `a` on by less is `b`."""
    prior = {"a": 0.8, "b": 0.2}
    query = [math.log(0.7), math.log(0.3)]  # raw pick a; 0.7 / 0.8 < 0.3 / 0.2
    assert calibrated_pick(["a", "b"], query, prior) == "b"
    assert calibrated_pick(["a", "b"], [math.log(0.95), math.log(0.05)], prior) == "a"
    assert calibrated_pick(["a", "b"], [0.0, -1.0], {"a": 0.0, "b": 1.0}) == "a"  # an underflowed prior still picks


def test_an_option_no_shot_offered_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"\['zebra'\] are offered by a query but by none of the shots"):
        calibrated_pick(["a", "zebra"], [0.0, 0.0], {"a": 0.5, "b": 0.5})


def vowel_task(options=("yes", "no way")):
    return Task("vowel", [Example(w, options[0] if w[0] in "aeio" else options[1], options=options) for w in WORDS])


@pytest.fixture(scope="module")
def pgm():
    return make_pgm("llama", "prefix")


def test_the_runner_reports_calibrated_metrics_from_the_same_scores(pgm, tok, monkeypatch):
    """The calibrated picks are the raw scores with the shots' prior divided out: recomputed here from the option
    scores the runner itself asks for, they give the recorded calibrated accuracy and macro-F1."""
    import peft_metal.evaluation.runner as runner

    seen: list[tuple[str, list[float]]] = []
    real = runner._option_scores

    def recording(parts, tokenizer, prepared, example, role):
        scores = real(parts, tokenizer, prepared, example, role)
        seen.append((role, example, [score.mean_logprob for score in scores]))
        return scores

    monkeypatch.setattr(runner, "_option_scores", recording)
    [record] = evaluate(pgm, tok, [vowel_task()], ["metal"], shots=4, queries=5, seed=0, progress=False, calibration="shots")
    shots = [(e.options, scores) for role, e, scores in seen if role == "shot"]
    queries = [(e, scores) for role, e, scores in seen if role == "query"]
    assert len(shots) == 4 and len(queries) == 5
    prior = option_prior(shots)
    picks = [calibrated_pick(e.options, scores, prior) for e, scores in queries]
    assert record["acc_calibrated"] == pytest.approx(sum(p == e.output for p, (e, _) in zip(picks, queries)) / 5)
    assert record["macro_f1_calibrated"] == pytest.approx(macro_f1(picks, [e.output for e, _ in queries]))
    assert "acc_calibrated_stderr" in record and "macro_f1" in record


def test_without_calibration_records_are_as_before(pgm, tok):
    [record] = evaluate(pgm, tok, [vowel_task()], ["zero_shot"], shots=2, queries=3, seed=0, progress=False)
    assert "acc_calibrated" not in record and "macro_f1_calibrated" not in record


def test_calibrated_macro_f1_merges_over_seeds_as_a_draw_and_gets_its_own_table():
    records = [
        {"task": "t", "method": "metal", "metric": "acc_per_token", "score": 0.5, "acc_per_token": 0.5,
         "acc_calibrated": 0.5, "macro_f1": 0.3, "macro_f1_calibrated": f1, "n": 10, "seed": seed}
        for seed, f1 in ((0, 0.4), (1, 0.6))
    ]
    [merged] = merge_seeds(records)
    assert merged["macro_f1_calibrated"] == pytest.approx(0.5) and merged["macro_f1_calibrated_seed_scores"] == [0.4, 0.6]
    assert merged["macro_f1_calibrated_stderr"] == pytest.approx(0.1)
    table = markdown_table([merged])
    assert "macro-F1 calibrated from the shots (± across seeds' draws):" in table and "| t | 0.500 ± 0.100 |" in table


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(calibration="content-free"), "Unknown calibration 'content-free'"),
        (dict(calibration="shots", shots=0), "shots must be >= 1"),
    ],
)
def test_bad_calibration_settings_are_refused(settings, message):
    arguments = dict(methods="zero_shot", shots=4, queries=2)
    arguments.update(settings)
    with pytest.raises(ValueError, match=message):
        EvaluationSettings(**arguments)


def test_a_task_the_shots_cannot_calibrate_keeps_its_raw_metrics_and_says_why(pgm, tok):
    """A generative task, and one whose queries offer options no shot offers (distractors drawn per question), are
    scored as without calibration, with a note in place of the calibrated metrics."""
    generative = Task("upper", [Example(w, w.upper()) for w in WORDS])
    distractors = Task("pairs", [Example(w, w, options=(w, w[::-1])) for w in WORDS])
    results = evaluate(pgm, tok, [generative, distractors, vowel_task()], ["zero_shot"], shots=2, queries=2, seed=0,
                       progress=False, calibration="shots")
    upper, pairs, vowel = results
    assert "exact_match" in upper and "as generative" in upper["calibration"]
    assert "acc_per_token" in pairs and "macro_f1_calibrated" not in pairs
    assert "offered by none of the shots" in pairs["calibration"] and "calibration" not in vowel
    table = markdown_table(results)
    assert "Not calibrated:" in table and "- pairs / zero_shot: not applicable" in table
