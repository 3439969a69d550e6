"""Loading BIG-bench JSON tasks: small fixture trees, malformed files, and the real installed package."""

import json
import logging

import pytest
from conftest import TASKS_DIR, requires_bigbench, requires_tasks

from peft_metal.data import (
    Example,
    bigbench_root,
    list_bigbench_tasks,
    load_bigbench_file,
    load_bigbench_task,
    load_bigbench_tasks,
    tasks_for_split,
)


def write_task(folder, examples=None, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    data = {"name": folder.name, "description": "fixture", **fields}
    if examples is not None:
        data["examples"] = examples
    (folder / "task.json").write_text(json.dumps(data))


@pytest.fixture
def root(tmp_path):
    """A generative task with prefixes, a multiple-choice task, and a task split into two subtasks."""
    write_task(
        tmp_path / "counting",
        [
            {"input": "apple, pear", "target": ["2", "two", "2", ""]},
            {"input": "fig", "target": "1"},
            {"input": "fig", "target": "1"},
        ],
        example_input_prefix="\nQ: ",
        example_output_prefix="\nA: ",
    )
    write_task(
        tmp_path / "colors",
        [
            {"input": "sky?", "target_scores": {"red": 0, "blue": 1, "azure": 1}, "target": "blue, of course"},
            {"input": "grass?", "target_scores": {"green": 0.9, "red": 0.1}},
        ],
    )
    write_task(tmp_path / "arith")
    write_task(tmp_path / "arith" / "add", [{"input": "1+1", "target": "2"}])
    write_task(tmp_path / "arith" / "sub", [{"input": "3-1", "target": "2"}], example_output_prefix=" = ")
    (tmp_path / "__pycache__").mkdir()
    return tmp_path


def test_list_tasks(root):
    assert list_bigbench_tasks(root) == ["arith/add", "arith/sub", "colors", "counting"]


def test_generative_target_lists_and_prefixes(root):
    task = load_bigbench_task("counting", root)
    assert task.name == "counting" and task.metric == "generative"
    assert (task.input_prefix, task.output_prefix) == ("\nQ: ", "\nA: ")
    # Blank and repeated answers dropped, first answer kept as output; the duplicate "fig" example dropped.
    assert task.examples == [Example("apple, pear", "2", alternatives=("two",)), Example("fig", "1")]


def test_multiple_choice_uses_top_scored_options(root):
    task = load_bigbench_task("colors", root)
    assert task.metric == "multiple_choice"
    assert task.input_prefix is None and task.output_prefix is None
    sky, grass = task.examples
    assert sky == Example("sky?", "blue", options=("red", "blue", "azure"), alternatives=("azure",))
    assert grass.output == "green" and grass.options == ("green", "red")


def test_subtasks(root):
    add, sub = load_bigbench_task("arith/add", root), load_bigbench_task("arith/sub", root)
    assert add.name == "arith/add" and add.family == "arith"
    assert add.examples == [Example("1+1", "2")]
    # Each subtask keeps its own prefixes.
    assert add.output_prefix is None and sub.output_prefix == " = "


def test_parent_of_subtasks_points_at_them(root):
    with pytest.raises(ValueError, match="split into subtasks; load one of them: arith/add, arith/sub"):
        load_bigbench_task("arith", root)


def test_unknown_task_suggests_close_names(root):
    with pytest.raises(ValueError, match="Unknown BIG-bench task 'colours'.*Did you mean: colors"):
        load_bigbench_task("colours", root)
    with pytest.raises(ValueError, match="Unknown BIG-bench task 'xyz'.*list_bigbench_tasks"):
        load_bigbench_task("xyz", root)
    with pytest.raises(ValueError, match="Unknown BIG-bench task '../colors'"):
        load_bigbench_task("../colors", root)


def test_bad_root(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        list_bigbench_tasks(tmp_path / "missing")


def test_load_file_directly(root):
    task = load_bigbench_file(root / "colors" / "task.json")
    assert task.name == "colors" and len(task.examples) == 2
    assert load_bigbench_file(root / "arith" / "sub", name="custom").name == "custom"


def test_blank_target_examples_are_skipped_with_a_warning(tmp_path, caplog):
    blank_record, blank_list = {"input": "", "target": ""}, {"input": "q", "target": [""]}
    write_task(tmp_path / "t", [blank_record, blank_list, {"input": "q", "target": "a"}])
    with caplog.at_level(logging.WARNING, logger="peft_metal.data.bigbench"):
        task = load_bigbench_task("t", tmp_path)
    assert task.examples == [Example("q", "a")]
    assert "skipped 2 example(s)" in caplog.text


def test_all_blank_targets_is_an_error(tmp_path):
    write_task(tmp_path / "t", [{"input": "q", "target": ""}])
    with pytest.raises(ValueError, match="none of its examples has a non-blank target"):
        load_bigbench_task("t", tmp_path)


@pytest.mark.parametrize(
    "examples, message",
    [
        (None, "has no 'examples' list"),
        ([], "'examples' must be a non-empty list"),
        ({"input": "q"}, "'examples' must be a non-empty list"),
        ([["q", "a"]], r"examples\[0\]: expected a JSON object"),
        ([{"input": "q", "target": "a"}, {"target": "a"}], r"examples\[1\]: has no 'input'"),
        ([{"input": "q"}], r"examples\[0\]: has neither 'target' nor 'target_scores'"),
        ([{"input": "q", "target_scores": {}}], r"examples\[0\]: 'target_scores' must be a non-empty object"),
        ([{"input": "q", "target_scores": ["a", "b"]}], r"examples\[0\]: 'target_scores' must be a non-empty"),
        ([{"input": "q", "target_scores": {"a": "1"}}], r"examples\[0\]: the score of option 'a' must be a number"),
        ([{"input": "q", "target": 3}], r"examples\[0\]: 'target' must be a string or a list of strings"),
        ([{"input": "q", "target": ["a", 3]}], r"examples\[0\]: 'target' must be a string or a list"),
        ([{"input": 7, "target": "a"}], r"examples\[0\]: Example.input must be a string"),
        ([{"input": "q", "target_scores": {"": 1, "a": 0}}], r"examples\[0\]: Example.output is blank"),
    ],
)
def test_malformed_examples_name_file_and_problem(tmp_path, examples, message):
    write_task(tmp_path / "bad", examples)
    with pytest.raises(ValueError, match=message) as raised:
        load_bigbench_task("bad", tmp_path)
    assert str(tmp_path / "bad" / "task.json") in str(raised.value)


def test_bad_json_and_top_level(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "task.json").write_text('{"examples": [')
    with pytest.raises(ValueError, match="broken/task.json: not valid JSON"):
        load_bigbench_task("broken", tmp_path)
    (tmp_path / "listy").mkdir()
    (tmp_path / "listy" / "task.json").write_text("[]")
    with pytest.raises(ValueError, match="listy/task.json: expected a JSON object"):
        load_bigbench_task("listy", tmp_path)


def test_bad_prefix_type(tmp_path):
    write_task(tmp_path / "t", [{"input": "q", "target": "a"}], example_input_prefix=3)
    with pytest.raises(ValueError, match="'example_input_prefix' must be a string"):
        load_bigbench_task("t", tmp_path)


# The installed package (bigbench==1.0.0, installed --no-deps: never imported, only its files are read).

@requires_bigbench
def test_real_tasks():
    assert (bigbench_root() / "anachronisms" / "task.json").is_file()

    multiple_choice = load_bigbench_task("anachronisms")
    assert multiple_choice.metric == "multiple_choice"
    assert all(example.output in example.options for example in multiple_choice.examples)

    generative = load_bigbench_task("object_counting")
    assert generative.metric == "generative"
    assert any(example.alternatives for example in generative.examples)  # e.g. "three" / "3"

    subtask = load_bigbench_task("abstract_narrative_understanding/4_distractors")
    assert subtask.family == "abstract_narrative_understanding"
    assert all(len(example.options) == 5 for example in subtask.examples)


@requires_bigbench
def test_every_split_task_loads_with_enough_examples():
    names = tasks_for_split("train") + tasks_for_split("dev")
    available = set(list_bigbench_tasks())
    assert not set(names) - available
    too_small = {}
    for name in names:
        task = load_bigbench_task(name)
        assert task.name == name
        if len(task.examples) < 48:
            too_small[name] = len(task.examples)
    assert not too_small


@requires_tasks
def test_the_task_corpus_loads_whole_families_on_one_side_of_the_split():
    """The BIG-bench-format corpus ($PEFT_METAL_DATA/tasks): every task loads as multiple choice with room for 16 shots
    and the dev panel's queries, no family straddles train and dev, and the second dev panel names its dev tasks."""
    from peft_metal.evaluation.panels import DEV_PANEL_TASKS

    splits = {split: load_bigbench_tasks(root=TASKS_DIR / split) for split in ("train", "dev")}
    for tasks in splits.values():
        assert all(task.metric == "multiple_choice" and len(task.examples) >= 100 for task in tasks)
    families = {split: {task.family for task in tasks} for split, tasks in splits.items()}
    assert not families["train"] & families["dev"] and len(splits["train"]) == 88
    assert sorted(DEV_PANEL_TASKS.tasks) == sorted(task.name for task in splits["dev"])


def test_the_example_tasks_are_well_formed_multiple_choice():
    """The demo's fallback tasks: each loads, holds enough distinct examples for 16 shots and 24 queries, offers its
    answer among distinct options, and a two-way task is balanced, so always answering one label scores a half."""
    from collections import Counter

    from peft_metal.demo import EXAMPLE_TASK_DIR, EXAMPLE_TASKS

    assert list_bigbench_tasks(EXAMPLE_TASK_DIR) == sorted(EXAMPLE_TASKS)
    for name in EXAMPLE_TASKS:
        task = load_bigbench_task(name, root=EXAMPLE_TASK_DIR)
        assert len(task.examples) >= 40, name
        assert len({example.input for example in task.examples}) == len(task.examples), name
        for example in task.examples:
            assert example.options and example.output in example.options and not example.alternatives
            assert len(set(example.options)) == len(example.options)
        labels = Counter(example.output for example in task.examples)
        if len(task.examples[0].options) == 2:
            assert max(labels.values()) - min(labels.values()) <= len(task.examples) // 10, (name, labels)


def test_the_task_folder_can_be_named_by_the_environment(tmp_path, monkeypatch):
    """Where the package cannot be installed, $PEFT_METAL_BIGBENCH_TASKS names BIG-bench's folder of task folders
    (a clone's bigbench/benchmark_tasks); a wrong path is named with the variable."""
    from peft_metal.data.bigbench import TASKS_ENV

    write_task(tmp_path / "tasks" / "my_task", [{"input": "a", "target": "b"}])
    monkeypatch.setenv(TASKS_ENV, str(tmp_path / "tasks"))
    assert bigbench_root() == tmp_path / "tasks"
    assert list_bigbench_tasks() == ["my_task"] and load_bigbench_task("my_task").examples[0].output == "b"
    monkeypatch.setenv(TASKS_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"{TASKS_ENV}=.*missing is not a folder"):
        bigbench_root()
