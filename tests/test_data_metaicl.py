"""MetaICL's format and protocol: loading its folders, per-seed draws, macro-F1, and the errors bad files get."""

from __future__ import annotations

import json

import pytest
from conftest import METAICL_DIR, build_tokenizer, make_lm, make_pgm, requires_metaicl

from peft_metal.cli import main
from peft_metal.data import Example
from peft_metal.data.metaicl import (
    SEEDS,
    MetaICLTask,
    check_metaicl_split,
    load_metaicl_pool,
    load_metaicl_splits,
    load_metaicl_task,
    metaicl_seeds,
    read_metaicl_file,
)
from peft_metal.data.user import task_from_dataset
from peft_metal.evaluation.metrics import macro_f1
from peft_metal.evaluation.report import labelled_means, markdown_table, merge_seeds
from peft_metal.training import TrainingArguments
from peft_metal.training.trainer import dev_tasks_of, train_tasks_of

pytestmark = pytest.mark.one_thread  # tiny models (conftest)

LABELS = ["yes", "no"]
WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx", "yz", "ba", "dc", "fe"]


def record(task: str, word: str) -> dict:
    return {"task": task, "input": word, "output": "yes" if word[0] in "aeiou" else "no", "options": LABELS}


def write_jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def metaicl(tmp_path):
    """A MetaICL data folder: a dev task `vowel` (two seeds of 4 demonstrations, 12 test queries) and a train task
    `sound` with a pool."""
    data = tmp_path / "data"
    for seed in (100, 13):
        words = WORDS[:4] if seed == 100 else WORDS[4:8]
        write_jsonl(data / "vowel" / f"vowel_4_{seed}_train.jsonl", [record("vowel", w) for w in words])
        write_jsonl(data / "vowel" / f"vowel_4_{seed}_dev.jsonl", [record("vowel", w) for w in words[:2]])
    write_jsonl(data / "vowel" / "vowel_4_100_test.jsonl", [record("vowel", w.upper()) for w in WORDS[:12]])
    write_jsonl(data / "sound" / "sound_16384_100_train.jsonl", [record("sound", w + w) for w in WORDS])
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["sound"], "dev": ["vowel"]}))
    return tmp_path


def test_a_seed_gives_its_demonstrations_and_a_fixed_draw_of_test_queries(metaicl):
    task = load_metaicl_task(metaicl, "vowel", seeds=(100, 13), k=4)
    assert isinstance(task, MetaICLTask) and task.metric == "multiple_choice" and len(task.examples) == 12
    shots, queries = task.split(4, 5, seed=13)
    assert [shot.input for shot in shots] == WORDS[4:8]
    assert len(queries) == 5 and set(queries) <= set(task.examples)
    assert task.split(4, 5, seed=13) == (shots, queries)  # the same draw every time
    assert task.split(4, 5, seed=100)[1] != queries  # another seed, another draw
    assert task.split(2, 5, seed=13)[0] == shots[:2]
    assert len(task.split(4, 100, seed=13)[1]) == 12  # at most N: all there are


def test_asking_for_what_does_not_exist_names_what_does(metaicl):
    with pytest.raises(ValueError, match=r"no k=4 demonstrations for seed\(s\) 42 .* its k=4 seeds are: 100, 13"):
        load_metaicl_task(metaicl, "vowel", seeds=(100, 42), k=4)
    with pytest.raises(ValueError, match=r"no k=16 demonstrations for seed\(s\) 100, 13"):
        load_metaicl_task(metaicl, "vowel", seeds=(100, 13))
    with pytest.raises(ValueError, match=r"No MetaICL task 'vowels' .* it has: sound, vowel"):
        load_metaicl_task(metaicl, "vowels", seeds=(100,), k=4)
    with pytest.raises(ValueError, match="no test file .* a meta-training task"):
        load_metaicl_task(metaicl, "sound", seeds=(), k=4)
    task = load_metaicl_task(metaicl, "vowel", seeds=(100,), k=4)
    with pytest.raises(ValueError, match="no demonstrations for seed 13; it has seeds 100"):
        task.split(4, 5, seed=13)
    with pytest.raises(ValueError, match="gives 4 demonstrations for seed 100; asked for 16 shots"):
        task.split(16, 5, seed=100)
    assert metaicl_seeds(metaicl, "vowel", k=4) == [100, 13]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a", "b"]', "line 2: expected a JSON object"),
        ('{"task": "t", "input": "x", "output": "maybe", "options": ["yes", "no"]}',
         r"line 2: Correct answer 'maybe' is not one of the options \['yes', 'no'\]"),
        ('{"task": "t", "input": "x", "options": ["yes", "no"]}', r"line 2: missing \['output'\]"),
        ('{"task": "t", "input": "x", "output": 1, "options": ["yes", "no"]}', "line 2: 'output' must be the correct"),
    ],
)
def test_a_malformed_line_names_the_file_and_the_line(tmp_path, line, message):
    path = tmp_path / "t_16_100_train.jsonl"
    path.write_text(json.dumps(record("t", "ab")) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as raised:
        read_metaicl_file(path)
    assert str(path) in str(raised.value)


def test_empty_options_make_a_generative_example_and_a_repeated_option_is_kept_once(tmp_path):
    path = tmp_path / "q.jsonl"
    write_jsonl(path, [
        {"task": "q", "input": "capital of France?", "output": "Paris", "options": []},
        {"task": "q", "input": "strong", "output": "durable", "options": ["durable", "weak", "durable"]},
    ])
    assert read_metaicl_file(path) == [
        Example("capital of France?", "Paris"), Example("strong", "durable", options=("durable", "weak"))
    ]


def test_pools_and_the_split_guard(metaicl):
    assert len(load_metaicl_pool(metaicl, "sound").examples) == len(WORDS)
    # an evaluation task has no pool: its k-shot files of every seed, duplicates dropped (the dev loss)
    assert {e.input for e in load_metaicl_pool(metaicl, "vowel").examples} == set(WORDS[:8])
    assert load_metaicl_splits(metaicl)["dev"] == ["vowel"]
    check_metaicl_split(metaicl, ["sound"], "train")
    with pytest.raises(ValueError, match=r"vowel \(dev\): train may only use the train tasks"):
        check_metaicl_split(metaicl, ["sound", "vowel"], "train")
    with pytest.raises(ValueError, match=r"other \(in no split\)"):
        check_metaicl_split(metaicl, ["other"], "dev")


def test_a_datasets_dataset_with_metaicls_columns_loads(metaicl):
    datasets = pytest.importorskip("datasets")
    path = metaicl / "data" / "sound" / "sound_16384_100_train.jsonl"
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    task = task_from_dataset(dataset, "sound")
    assert task.examples == load_metaicl_pool(metaicl, "sound").examples


def test_macro_f1_is_scikit_learns_macro_average():
    # per label: a has P=1/2 R=1/1 -> 2/3; b has P=0 R=0 -> 0; c predicted only -> 0
    assert macro_f1(["a", "a", "c"], ["a", "b", "b"]) == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert macro_f1(["x", "y", "x"], ["x", "y", "x"]) == 1.0
    with pytest.raises(ValueError, match="as many predictions as gold answers"):
        macro_f1(["x"], ["x", "y"])


def test_macro_f1_is_averaged_over_seeds_with_the_draws_error():
    records = [
        {"task": "t", "method": "icl", "metric": "acc_per_token", "score": 0.5, "acc_per_token": 0.5,
         "acc_per_token_stderr": 0.1, "macro_f1": f1, "n": 10, "seed": seed, "eval_seconds": 1.0}
        for seed, f1 in ((100, 0.4), (13, 0.6))
    ]
    [merged] = merge_seeds(records)
    assert merged["macro_f1"] == pytest.approx(0.5) and merged["macro_f1_seed_scores"] == [0.4, 0.6]
    assert merged["macro_f1_stderr"] == pytest.approx(0.1)  # sample sd 0.1414 over sqrt(2)
    assert "| t | 0.500 ± 0.100 |" in markdown_table([merged])


def test_training_draws_from_metaicl_and_a_bigbench_format_folder_at_once(metaicl, tmp_path):
    folder = tmp_path / "own" / "mine"
    folder.mkdir(parents=True)
    examples = [{"input": w, "target_scores": {"yes": 1, "no": 0}} for w in WORDS]
    (folder / "task.json").write_text(json.dumps({"examples": examples}))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), metaicl_dir=str(metaicl), task_dir=str(tmp_path / "own"))
    assert [task.name for task in train_tasks_of(args)] == ["sound", "mine"]
    assert [task.name for task in dev_tasks_of(args)] == ["vowel"]
    wrong = TrainingArguments(output_dir=str(tmp_path / "run"), metaicl_dir=str(metaicl), metaicl_tasks=["vowel"])
    with pytest.raises(ValueError, match=r"vowel \(dev\): train may only use"):
        train_tasks_of(wrong)
    with pytest.raises(ValueError, match="not a MetaICL data folder"):
        TrainingArguments(output_dir=str(tmp_path / "run"), metaicl_dir=str(tmp_path / "own"))


def test_eval_runs_metaicls_protocol_and_reports_macro_f1(metaicl, tmp_path):
    make_lm("llama").save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    make_pgm("llama", "prefix").save_pretrained(tmp_path / "pgm")
    output = tmp_path / "r.json"
    code = main([
        "eval", "--model", str(tmp_path / "model"), "--pgm", str(tmp_path / "pgm"), "--metaicl", str(metaicl),
        "--split", "dev", "--shots", "4", "--queries", "3", "--seed", "100,13", "--methods", "zero_shot,icl,metal",
        "--output", str(output), "--no-progress",
    ])
    assert code == 0
    payload = json.loads(output.read_text())
    assert payload["settings"]["seeds"] == [100, 13] and payload["settings"]["task_source"] == str(metaicl)
    for result in payload["results"]:
        assert result["task"] == "vowel" and result["n"] == 6 and len(result["macro_f1_seed_scores"]) == 2
        assert 0 <= result["macro_f1"] <= 1
    assert payload["summary"]["icl"]["macro_f1"] == payload["results"][1]["macro_f1"]
    assert "macro-F1" in (tmp_path / "r.md").read_text()
    means = labelled_means(output)  # what a PGM's card records
    assert means["icl macro-F1 (1 tasks, seeds 100,13, 4 shots)"] == round(payload["summary"]["icl"]["macro_f1"], 4)
    assert means["icl (1 tasks, seeds 100,13, 4 shots)"] == round(payload["summary"]["icl"]["mean"], 4)


def test_eval_calibrates_from_the_shots_when_asked(metaicl, tmp_path):
    make_lm("llama").save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    output = tmp_path / "r.json"
    code = main([
        "eval", "--model", str(tmp_path / "model"), "--metaicl", str(metaicl), "--split", "dev", "--shots", "4",
        "--queries", "3", "--seed", "100,13", "--methods", "zero_shot", "--calibration", "shots",
        "--output", str(output), "--no-progress",
    ])
    assert code == 0
    payload = json.loads(output.read_text())
    assert payload["settings"]["calibration"] == "shots"
    [result] = payload["results"]
    assert len(result["macro_f1_calibrated_seed_scores"]) == 2 and 0 <= result["acc_calibrated"] <= 1
    assert payload["summary"]["zero_shot"]["macro_f1_calibrated"] == result["macro_f1_calibrated"]
    assert "macro-F1 calibrated from the shots" in (tmp_path / "r.md").read_text()
    assert "zero_shot macro-F1 calibrated (1 tasks, seeds 100,13, 4 shots)" in labelled_means(output)


def test_eval_names_a_missing_seed_before_loading_a_model(metaicl, tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "missing"), "--metaicl", str(metaicl), "--tasks", "vowel",
                 "--shots", "4", "--seed", "7"])
    assert code == 2 and "seed(s) 7" in capsys.readouterr().err


# The corpora the project meta-trains and chooses on ($PEFT_METAL_DATA/metaicl).

@requires_metaicl
def test_every_dev_task_has_metaicls_five_seeds_of_16_and_test_queries():
    from peft_metal.evaluation.panels import DEV_PANEL
    from peft_metal.evaluation.tasks import load_panel_tasks

    splits = load_metaicl_splits(METAICL_DIR)
    assert set(DEV_PANEL.tasks) == set(splits["dev"]) and not set(splits["dev"]) & set(splits["train"])
    tasks = load_panel_tasks(DEV_PANEL, METAICL_DIR)
    for task in tasks:
        assert task.metric == "multiple_choice" and len(task.examples) >= 80  # ethos-gender has 86
        for seed in SEEDS:
            shots, queries = task.split(16, DEV_PANEL.queries, seed)
            assert len(shots) == 16 and len(queries) == min(DEV_PANEL.queries, len(task.examples))
            assert not {shot.input for shot in shots} & {query.input for query in queries}


@requires_metaicl
def test_every_train_pool_loads():
    splits = load_metaicl_splits(METAICL_DIR)
    sizes = {name: len(load_metaicl_pool(METAICL_DIR, name).examples) for name in splits["train"]}
    assert len(sizes) == 69 and sum(sizes.values()) > 100_000


def test_one_seeds_macro_f1_is_shown_without_an_error_it_does_not_have():
    record = {"task": "t", "method": "icl", "metric": "acc_per_token", "score": 0.5, "acc_per_token": 0.5,
              "acc_per_token_stderr": 0.1, "macro_f1": 0.4, "n": 10, "eval_seconds": 1.0}
    table = markdown_table([record])
    assert "± nan" not in table and "| icl | 0.500 ± 0.100 | 0.400 |" in table and "| **mean** | **0.400** |" in table
