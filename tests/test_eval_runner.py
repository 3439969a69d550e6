"""The evaluation runner: records for every task and method, errors recorded or raised, and the results writer."""

from __future__ import annotations

import json

import pytest
from conftest import make_pgm

from peft_metal.data import Example, Task
from peft_metal.evaluation import evaluate, markdown_table, resolve_methods, write_results
from peft_metal.evaluation.report import merge_seeds

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st"]
METHODS = ["zero_shot", "icl", "metal", "metal+demos"]
RECORD_KEYS = {"task", "method", "metric", "score", "n", "prompt_seconds", "context_tokens", "eval_seconds"}


pytestmark = pytest.mark.one_thread  # tiny models (conftest)


def mc_task(name="vowel", size=len(WORDS)):
    options = ("yes", "no way")
    return Task(name, [Example(w, "yes" if w[0] in "aeio" else "no way", options=options) for w in WORDS[:size]])


def gen_task(name="upper"):
    return Task(name, [Example(w, w.upper(), alternatives=(w.upper() + "!",)) for w in WORDS])


@pytest.fixture(scope="module")
def pgm():
    return make_pgm("llama", "prefix")


def test_records_for_every_task_and_method(pgm, tok):
    results = evaluate(pgm, tok, [mc_task(), gen_task()], METHODS, shots=3, queries=2, seed=0, progress=False,
                       num_demonstrations=1, max_new_tokens=4)
    assert [(r["task"], r["method"]) for r in results] == [(t, m) for t in ("vowel", "upper") for m in METHODS]
    for record in results:
        assert RECORD_KEYS <= set(record) and "error" not in record
        assert record["n"] == 2 and 0.0 <= record["score"] <= 1.0 and record["eval_seconds"] > 0
        assert (record["prompt_seconds"] > 0) == record["method"].startswith("metal")
    by = {(r["task"], r["method"]): r for r in results}
    assert by["vowel", "zero_shot"]["metric"] == "acc_per_token" and "acc" in by["vowel", "icl"]
    for name in ("acc", "acc_norm", "acc_per_token"):
        assert 0.0 <= by["vowel", "icl"][name] <= 1.0 and by["vowel", "icl"][f"{name}_stderr"] >= 0.0
    assert by["vowel", "icl"]["score"] == by["vowel", "icl"]["acc_per_token"]
    assert by["upper", "icl"]["metric"] == "exact_match" and 0.0 <= by["upper", "icl"]["token_f1"] <= 1.0
    assert by["upper", "icl"]["score"] == by["upper", "icl"]["exact_match"] and "token_f1_stderr" in by["upper", "icl"]
    assert by["vowel", "zero_shot"]["context_tokens"] == 0
    assert by["vowel", "metal"]["context_tokens"] == 4  # K, no demonstrations
    assert by["vowel", "metal+demos"]["context_tokens"] > 4
    assert by["vowel", "icl"]["context_tokens"] > by["vowel", "metal+demos"]["context_tokens"] - 4
    again = evaluate(pgm, tok, [mc_task()], ["icl"], shots=3, queries=2, seed=0, progress=False)
    assert again[0]["score"] == by["vowel", "icl"]["score"]


def test_failing_task_is_recorded_and_the_run_goes_on(pgm, tok):
    tasks = [mc_task("tiny", size=3), gen_task(), mc_task()]
    results = evaluate(pgm, tok, tasks, ["zero_shot", "metal"], shots=2, queries=2, seed=1, progress=False,
                       metric="multiple_choice")
    errors = {(r["task"], r["method"]): r["error"] for r in results if "error" in r}
    assert set(errors) == {("tiny", "zero_shot"), ("tiny", "metal"), ("upper", "zero_shot"), ("upper", "metal")}
    assert "has 3 examples" in errors["tiny", "metal"] and "no options" in errors["upper", "metal"]
    assert all(set(r) == {"task", "method", "error"} for r in results if "error" in r)
    assert [r["method"] for r in results if r["task"] == "vowel" and "error" not in r] == ["zero_shot", "metal"]
    table = markdown_table(results)
    assert "| tiny | - | error | error |" in table and "Errors:" in table


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"methods": ["zero_shot", "meta"]}, ValueError, "Did you mean 'metal'"),
        ({"methods": "icl,zeroshot"}, ValueError, "Did you mean 'zero_shot'"),
        ({"methods": ["metal+demos"], "num_demonstrations": 3}, ValueError, "shots > num_demonstrations"),
        ({"metric": "mc"}, ValueError, "Unknown metric"),
        ({"tasks": [mc_task("tiny", size=3)]}, ValueError, "has 3 examples"),  # one task: raised
        ({"tasks": [gen_task()], "metric": "multiple_choice"}, ValueError, "no options"),
    ],
)
def test_bad_inputs_raise_clear_errors(pgm, tok, kwargs, error, message):
    arguments = dict(tasks=[mc_task()], methods=["zero_shot"], shots=3, queries=2, seed=0, progress=False)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        evaluate(pgm, tok, **arguments)


def test_resolve_methods():
    assert resolve_methods("zero_shot, icl,metal+demos") == ["zero_shot", "icl", "metal+demos"]
    with pytest.raises(ValueError, match="more than once"):
        resolve_methods(["icl", "icl"])


def test_write_results(tmp_path):
    results = [
        {"task": "a", "method": "icl", "metric": "accuracy", "score": 0.5, "n": 2, "prompt_seconds": 0.0,
         "context_tokens": 10, "eval_seconds": 0.1},
        {"task": "a", "method": "metal", "error": "ValueError: boom"},
    ]
    paths = write_results(results, tmp_path / "out" / "results.json")
    written = json.loads(paths["json"].read_text())
    assert written["results"] == results
    # a record without `_stderr` fields: the sample standard error of its 0/1 score, as lm-eval's: sqrt(0.25 / (2 - 1))
    assert written["summary"] == {"icl": {"mean": 0.5, "se": 0.5, "tasks": 1, "questions": 2}}
    markdown = paths["markdown"].read_text()
    assert "| a | accuracy | 0.500 | error |" in markdown
    assert "**0.500** ± 0.500" in markdown
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_seeds_weights_scores_by_questions():
    records = [
        {"task": "a", "method": "icl", "metric": "accuracy", "score": 1.0, "n": 2, "eval_seconds": 1.0,
         "context_tokens": 10, "seed": 0},
        {"task": "a", "method": "icl", "metric": "accuracy", "score": 0.5, "n": 4, "eval_seconds": 2.0,
         "context_tokens": 20, "seed": 1},
        {"task": "b", "method": "icl", "error": "ValueError: boom", "seed": 0},
        {"task": "b", "method": "icl", "metric": "accuracy", "score": 1.0, "n": 2, "seed": 1},
    ]
    merged = merge_seeds(records)
    assert merged[0]["score"] == pytest.approx(4 / 6) and merged[0]["n"] == 6 and merged[0]["seeds"] == [0, 1]
    assert merged[0]["eval_seconds"] == 3.0 and merged[0]["context_tokens"] == 15
    assert "seed" not in merged[0]
    assert "error" in merged[1] and merged[1]["seeds"] == [0, 1]


def test_standard_error_across_draws_counts_how_much_each_tasks_seeds_disagree(tmp_path):
    """`draw_se`: per task the variance of its seeds' scores over the number of seeds, summed over tasks, square
    root over the number of tasks; absent for one seed; shown as its own row of the markdown table."""
    from peft_metal.evaluation.report import draw_standard_error, summary

    scores = {"a": (0.2, 0.6), "b": (0.5, 0.5), "c": (1.0, 0.8)}
    records = [{"task": task, "method": "metal", "metric": "acc", "score": score, "n": 25, "seed": seed}
               for task, pair in scores.items() for seed, score in enumerate(pair)]
    merged = merge_seeds(records)
    assert [record["seed_scores"] for record in merged] == [list(pair) for pair in scores.values()]
    expected = ((0.4**2 / 4 + 0.0 + 0.2**2 / 4) ** 0.5) / 3  # two seeds: variance (s0 - s1)^2 / 2, over 2 seeds
    assert draw_standard_error(merged) == pytest.approx(expected)
    assert summary(merged)["metal"]["draw_se"] == pytest.approx(expected)
    one_seed = [record for record in records if record["seed"] == 0]
    assert draw_standard_error(merge_seeds(one_seed)) is None and "draw_se" not in summary(merge_seeds(one_seed))
    write_results(merged, tmp_path / "results.json")
    assert f"| ± across seeds' draws | | {expected:.3f} |" in (tmp_path / "results.md").read_text()


def test_merged_standard_errors_are_those_of_the_pooled_questions():
    from peft_metal.evaluation.metrics import mean_stderr

    seeds = {0: [1.0, 1.0], 1: [1.0, 0.0, 0.0, 1.0], 2: [0.0]}
    records = []
    for seed, hits in seeds.items():
        acc, acc_stderr = mean_stderr(hits)
        records.append({"task": "a", "method": "icl", "metric": "acc", "score": acc, "acc": acc,
                        "acc_stderr": acc_stderr, "n": len(hits), "seed": seed})
    merged = merge_seeds(records)[0]
    pooled = mean_stderr([hit for hits in seeds.values() for hit in hits])
    assert (merged["acc"], merged["acc_stderr"]) == pytest.approx(pooled)
    assert merged["score"] == pytest.approx(pooled[0])


def test_results_json_names_metrics_as_lm_eval(pgm, tok, tmp_path):
    results = evaluate(pgm, tok, [mc_task(), gen_task()], ["icl"], shots=3, queries=3, seed=0, progress=False,
                       max_new_tokens=3)
    written = json.loads(write_results(results, tmp_path / "results.json")["json"].read_text())
    mc, gen = written["results"]
    for name in ("acc", "acc_norm", "acc_per_token"):
        assert {name, f"{name}_stderr"} <= set(mc) and 0.0 <= mc[name] <= 1.0
        assert written["summary"]["icl"][name] == mc[name]  # one task has it
    assert mc["metric"] == "acc_per_token" and gen["metric"] == "exact_match"
    assert {"exact_match", "exact_match_stderr", "token_f1", "token_f1_stderr"} <= set(gen)
    assert "score_sum" not in mc and "accuracy" not in json.dumps(written)
    markdown = (tmp_path / "results.md").read_text()
    assert "| method | acc | acc_norm | acc_per_token | macro_f1 | exact_match | token_f1 |" in markdown
