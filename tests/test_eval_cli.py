"""`peft-metal eval` on a tiny model and PGM saved to disk, with tasks from a folder of BIG-bench JSON files."""

from __future__ import annotations

import json

import pytest
from conftest import (
    METAICL_DIR,
    build_tokenizer,
    make_lm,
    make_pgm,
    requires_bigbench,
    requires_metaicl,
    requires_tasks,
)

from peft_metal.cli import main
from peft_metal.data import load_splits
from peft_metal.data.bigbench import bigbench_root
from peft_metal.evaluation import check_eval_task, load_eval_tasks

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st"]
RECORD_KEYS = {"task", "method", "metric", "score", "n", "prompt_seconds", "context_tokens", "eval_seconds"}


pytestmark = pytest.mark.one_thread  # tiny models (conftest)

def write_bigbench_task(root, name, examples):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"name": name, "examples": examples}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    make_lm("llama").save_pretrained(root / "model")
    build_tokenizer().save_pretrained(root / "model")
    make_pgm("llama", "prefix").save_pretrained(root / "pgm")
    tasks = root / "tasks"
    write_bigbench_task(tasks, "my_vowels", [
        {"input": w, "target_scores": {"yes": int(w[0] in "aeio"), "no": int(w[0] not in "aeio")}} for w in WORDS
    ])
    write_bigbench_task(tasks, "my_upper", [{"input": w, "target": [w.upper(), w.upper() + "."]} for w in WORDS])
    return root


def test_cli_writes_json_markdown_and_plot(saved, tmp_path, capsys):
    output = tmp_path / "results.json"
    code = main([
        "eval", "--model", str(saved / "model"), "--pgm", str(saved / "pgm"), "--task-dir", str(saved / "tasks"),
        "--tasks", "my_vowels,my_upper", "--shots", "3", "--queries", "2", "--methods", "zero_shot,icl,metal",
        "--seed", "0", "--max-new-tokens", "4", "--output", str(output), "--no-progress",
    ])
    assert code == 0
    payload = json.loads(output.read_text())
    records = payload["results"]
    assert [(r["task"], r["method"]) for r in records] == [
        (t, m) for t in ("my_vowels", "my_upper") for m in ("zero_shot", "icl", "metal")
    ]
    assert all(RECORD_KEYS <= set(r) for r in records)
    assert payload["settings"]["pgm"] == str(saved / "pgm")
    assert "| my_upper | exact_match |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "Wrote" in capsys.readouterr().out


def reserved_family() -> str:
    """A BIG-bench family in neither split (reserved for acceptance testing)."""
    splits = load_splits()
    allowed = set(splits["train_families"]) | set(splits["dev_families"])
    families = sorted(path.name for path in bigbench_root().iterdir() if (path / "task.json").is_file())
    return next(family for family in families if family not in allowed)


@requires_bigbench
def test_evaluation_accepts_any_bigbench_task():
    """The split guard is meta-training's: `peft-metal eval --tasks` takes a BIG-bench task of any family (its results
    are the user's business; this only checks the task is found and loaded)."""
    family = reserved_family()
    check_eval_task(family)
    assert load_eval_tasks(names=[family])[0].family == family


@requires_bigbench
def test_cli_names_a_missing_task_before_loading_anything(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "missing"), "--tasks", "no_such_family_at_all",
                 "--output", str(tmp_path / "r.json")])
    assert code == 2 and "No BIG-bench task family 'no_such_family_at_all'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.fixture
def without_bigbench(monkeypatch):
    """As on a machine without a clone of BIG-bench (the package that carried its files is no longer served)."""
    from peft_metal.data.bigbench import TASKS_ENV

    monkeypatch.delenv(TASKS_ENV, raising=False)


def test_cli_without_the_task_data_says_how_to_get_it(tmp_path, capsys, without_bigbench):
    """Without BIG-bench's folders, eval names the setting and the other task sources, before loading a model;
    settings are still checked first, so a typo is named whatever the data."""
    code = main(["eval", "--model", str(tmp_path / "missing"), "--split", "dev", "--output", str(tmp_path / "r.json")])
    error = capsys.readouterr().err
    assert code == 2 and "PEFT_METAL_BIGBENCH_TASKS" in error and "--task-dir" in error and "--metaicl" in error
    assert not (tmp_path / "r.json").exists()
    code = main(["eval", "--model", str(tmp_path / "missing"), "--split", "dev", "--methods", "zero-shot"])
    assert code == 2 and "Did you mean 'zero_shot'" in capsys.readouterr().err


def test_train_without_any_task_source_stops_before_loading_a_model(tmp_path, capsys, monkeypatch, without_bigbench):
    import peft_metal.pgm
    import peft_metal.training

    monkeypatch.setattr(peft_metal.pgm, "load_pgm", lambda *args, **kwargs: pytest.fail("loaded a model"))
    monkeypatch.setattr(peft_metal.training, "MetaTrainer", lambda *args, **kwargs: pytest.fail("built a trainer"))
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "run")}))
    assert main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("peft-metal train: error: BIG-bench's task files are not here")
    assert "metaicl_dir" in error and "task_dir" in error


def test_demo_without_the_task_data_runs_on_the_example_tasks(tmp_path, capsys, monkeypatch):
    """The main job runs on a fresh machine without the task corpora, and says what it ran on."""
    from peft_metal.data.corpora import DATA_ENV
    from peft_metal.demo import EXAMPLE_TASK_DIR, EXAMPLE_TASKS

    monkeypatch.delenv(DATA_ENV, raising=False)
    make_lm("llama", max_positions=2048).save_pretrained(tmp_path / "model")  # room for 6 shots of characters
    build_tokenizer().save_pretrained(tmp_path / "model")
    output = tmp_path / "d.json"
    with pytest.warns(UserWarning, match="fresh, untrained PGM"):
        code = main(["demo", "--model", str(tmp_path / "model"), "--shots", "6", "--queries", "2", "--output", str(output)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{DATA_ENV} is not set" in printed and "example tasks" in printed and "SUMMARY:" in printed
    payload = json.loads(output.read_text())
    assert payload["settings"]["tasks"] == list(EXAMPLE_TASKS)
    assert payload["settings"]["task_source"] == str(EXAMPLE_TASK_DIR) and payload["settings"]["seed"] == 0
    assert {(record["task"], record["method"]) for record in payload["results"] if "error" not in record} == {
        (task, method) for task in EXAMPLE_TASKS for method in ("zero_shot", "icl", "metal", "metal+demos+refine")
    }
    # every method also scored calibrated from the shots, as the server's `calibrate` picks, where the shots offer
    # every option (the two-label tasks); the tasks with distractors per question say why they are not
    calibrated = {record["task"] for record in payload["results"] if "macro_f1_calibrated" in record}
    assert calibrated == {"review_sentiment", "number_parity"}
    assert all("calibration" in record for record in payload["results"] if record["task"] not in calibrated)


def dev_task() -> str:
    return load_splits()["dev_tasks"][0]


@requires_bigbench
def test_cli_suggests_allowed_tasks_for_typos(tmp_path, capsys):
    typo = dev_task()[:-1] + "x"
    code = main(["eval", "--model", str(tmp_path / "missing"), "--tasks", typo])
    assert code == 2 and f"Did you mean: {dev_task()}" in capsys.readouterr().err


def test_cli_without_pgm_warns_and_uses_a_fresh_one(saved, tmp_path):
    output = tmp_path / "results.json"
    with pytest.warns(UserWarning, match="fresh, untrained PGM"):
        code = main(["eval", "--model", str(saved / "model"), "--task-dir", str(saved / "tasks"), "--tasks",
                     "my_vowels", "--shots", "2", "--queries", "1", "--methods", "metal", "--output", str(output),
                     "--no-progress"])
    assert code == 0
    record = json.loads(output.read_text())["results"][0]
    assert record["method"] == "metal" and record["context_tokens"] == 16  # the default K


def test_cli_suggests_method_names(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "missing"), "--split", "dev", "--methods", "zero-shot"])
    assert code == 2 and "Did you mean 'zero_shot'" in capsys.readouterr().err


def test_confirmation_panel_draws_the_same_tasks_again():
    """`bigbench-panel-confirm` scores the panel's tasks on seeds the panel does not use: other shots and queries."""
    from peft_metal.evaluation.panels import BIGBENCH_PANEL, BIGBENCH_PANEL_CONFIRM

    assert BIGBENCH_PANEL_CONFIRM.tasks == BIGBENCH_PANEL.tasks
    assert BIGBENCH_PANEL_CONFIRM.questions == BIGBENCH_PANEL.questions
    assert not set(BIGBENCH_PANEL_CONFIRM.seeds) & set(BIGBENCH_PANEL.seeds)


@requires_bigbench
@pytest.mark.parametrize("panel_name", ["bigbench-panel", "bigbench-panel-confirm"])
def test_dev_panel_runs_its_tasks_over_both_seeds_with_standard_errors(saved, tmp_path, panel_name):
    """`--split dev-panel` (and its confirmation draw): the named panel's tasks, its seeds (records merged over them)
    and its queries unless given; every task is a dev family's, and the report carries standard errors."""
    from peft_metal.evaluation.panels import BIGBENCH_PANEL as DEV_PANEL
    from peft_metal.evaluation.panels import PANELS

    panel = PANELS[panel_name]

    splits = load_splits()
    families = {task.split("/", 1)[0] for task in DEV_PANEL.tasks}
    assert families <= set(splits["dev_families"])
    assert len(DEV_PANEL.tasks) >= 12 and DEV_PANEL.questions >= 600 and DEV_PANEL.seeds == (0, 1)
    assert all(sum(t.split("/", 1)[0] == family for t in DEV_PANEL.tasks) <= 2 for family in families)

    output = tmp_path / "panel.json"
    code = main([
        "eval", "--model", str(saved / "model"), "--pgm", str(saved / "pgm"), "--split", panel_name,
        "--queries", "1", "--methods", "zero_shot", "--shots", "1", "--output", str(output), "--no-progress",
    ])
    assert code == 0
    payload = json.loads(output.read_text())
    assert payload["settings"]["panel"] == panel_name and payload["settings"]["seeds"] == list(panel.seeds)
    assert [record["task"] for record in payload["results"]] == list(panel.tasks)
    for record in payload["results"]:
        assert record["seeds"] == list(panel.seeds)
        assert "error" in record or record["n"] == 2
    assert "zero_shot" in payload["summary"] and payload["summary"]["zero_shot"]["se"] >= 0
    assert "±" in output.with_suffix(".md").read_text()


def test_cli_refines_with_the_given_batch_size_and_records_it(saved, tmp_path):
    output = tmp_path / "refined.json"
    code = main([
        "eval", "--model", str(saved / "model"), "--pgm", str(saved / "pgm"), "--task-dir", str(saved / "tasks"),
        "--tasks", "my_vowels", "--shots", "3", "--queries", "2", "--methods", "metal+refine", "--refine-steps", "1",
        "--refine-batch-size", "3", "--seed", "0", "--output", str(output), "--no-progress",
    ])
    assert code == 0
    payload = json.loads(output.read_text())
    assert payload["settings"]["refine_batch_size"] == 3
    assert [record["refine_steps"] for record in payload["results"]] == [1]


def test_cli_refuses_a_refinement_batch_of_no_shots(saved, tmp_path, capsys):
    code = main([
        "eval", "--model", str(saved / "model"), "--task-dir", str(saved / "tasks"), "--tasks", "my_vowels",
        "--methods", "metal+refine", "--refine-batch-size", "0", "--output", str(tmp_path / "r.json"),
    ])
    assert code != 0
    assert "refine_batch_size" in capsys.readouterr().err


@requires_metaicl
@requires_tasks
@pytest.mark.parametrize("panel_name", ["dev-panel", "dev-panel-tasks"])
def test_the_dev_panels_run_from_the_corpora_setting(tmp_path, panel_name):
    """`--split dev-panel` (MetaICL's dev tasks, its five seeds) and `dev-panel-tasks` (the BIG-bench-format dev
    tasks) find their tasks through $PEFT_METAL_DATA, run every task over the panel's seeds, and say which panel."""
    from peft_metal.evaluation.panels import PANELS

    panel = PANELS[panel_name]
    make_lm("llama", max_positions=4096).save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    output = tmp_path / "panel.json"
    code = main([
        "eval", "--model", str(tmp_path / "model"), "--split", panel_name, "--queries", "1", "--shots", "1",
        "--methods", "zero_shot", "--output", str(output), "--no-progress",
    ])
    assert code == 0
    payload = json.loads(output.read_text())
    assert payload["settings"]["panel"] == panel_name and payload["settings"]["seeds"] == list(panel.seeds)
    assert [record["task"] for record in payload["results"]] == list(panel.tasks)
    assert all(record["n"] == len(panel.seeds) for record in payload["results"])


@requires_metaicl
def test_demo_runs_on_metaicl_dev_tasks_found_through_the_corpora_setting(tmp_path, capsys):
    """With $PEFT_METAL_DATA (as the Makefile sets it), the main job runs on four MetaICL dev tasks under MetaICL's
    protocol, on its first seed unless told otherwise, and records where its tasks came from."""
    from peft_metal.demo import DEMO_TASKS

    make_lm("llama", max_positions=4096).save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    output = tmp_path / "d.json"
    with pytest.warns(UserWarning, match="fresh, untrained PGM"):
        code = main(["demo", "--model", str(tmp_path / "model"), "--shots", "6", "--queries", "1", "--output", str(output)])
    assert code == 0 and "SUMMARY:" in capsys.readouterr().out
    settings = json.loads(output.read_text())["settings"]
    assert settings["tasks"] == list(DEMO_TASKS) and settings["seed"] == 100
    assert settings["task_source"] == str(METAICL_DIR)
