"""`Example`, `Task`, user-data loaders and the split guard."""

import json

import pytest

from peft_metal.data import (
    Example,
    Task,
    check_allowed,
    load_jsonl_task,
    load_splits,
    task_from_dataset,
    tasks_for_split,
)


def make_task(num_examples, name="family/sub"):
    return Task(name, [Example(f"q{i}", f"a{i}") for i in range(num_examples)])


# Example


def test_example_as_shot_and_answers():
    example = Example("2+2?", "4", alternatives=("four",))
    assert example.as_shot() == ("2+2?", "4")
    assert example.answers == ("4", "four")


def test_example_options_are_stored_as_tuple_and_hashable():
    example = Example("pick", "b", options=["a", "b"])
    assert example.options == ("a", "b")
    assert len({example, Example("pick", "b", options=("a", "b"))}) == 1


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"input": 3, "output": "a"}, TypeError, "input must be a string"),
        ({"input": "q", "output": None}, TypeError, "output must be a string"),
        ({"input": "q", "output": "  "}, ValueError, "blank"),
        ({"input": "q", "output": "a", "options": ()}, ValueError, "options is empty"),
        ({"input": "q", "output": "a", "options": "ab"}, TypeError, "tuple of strings"),
        ({"input": "q", "output": "a", "options": ("a", 1)}, TypeError, "only strings"),
        ({"input": "q", "output": "c", "options": ("a", "b")}, ValueError, "not one of the options"),
        ({"input": "q", "output": "a", "options": ("a", "a")}, ValueError, "duplicate"),
        ({"input": "q", "output": "a", "options": ("a", "b"), "alternatives": ("c",)}, ValueError, "not one of"),
        ({"input": "q", "output": "a", "alternatives": ("",)}, ValueError, "blank answer"),
    ],
)
def test_example_rejects_bad_fields(kwargs, error, message):
    with pytest.raises(error, match=message):
        Example(**kwargs)


def test_example_allows_empty_input():
    assert Example("", "The sensible sentence.", options=("The sensible sentence.", "Nonsense.")).input == ""


# Task


def test_task_metric_and_family():
    multiple_choice = Task("fam/sub", [Example("q", "a", options=("a", "b"))])
    mixed = Task("fam", [Example("q", "a", options=("a", "b")), Example("r", "x")])
    assert multiple_choice.metric == "multiple_choice"
    assert mixed.metric == "generative"
    assert multiple_choice.family == "fam"
    assert mixed.family == "fam"


@pytest.mark.parametrize(
    "args, error",
    [
        (("", [Example("q", "a")]), ValueError),
        (("t", []), ValueError),
        (("t", (Example("q", "a"),)), TypeError),
        (("t", [("q", "a")]), TypeError),
        (("t", [Example("q", "a")], 5), TypeError),
    ],
)
def test_task_rejects_bad_fields(args, error):
    with pytest.raises(error):
        Task(*args)


def test_split_is_disjoint_seeded_and_deterministic():
    task = make_task(30)
    shots, queries = task.split(8, 5, seed=3)
    assert len(shots) == 8 and len(queries) == 5
    assert not set(shots) & set(queries)
    assert task.split(8, 5, seed=3) == (shots, queries)
    assert task.split(8, 5, seed=4) != (shots, queries)


def test_split_can_use_every_example():
    task = make_task(6)
    shots, queries = task.split(4, 2, seed=0)
    assert set(shots) | set(queries) == set(task.examples)


def test_split_needs_enough_examples():
    with pytest.raises(ValueError, match=r"has 6 examples, but 4 shots \+ 3 queries need 7"):
        make_task(6).split(4, 3, seed=0)


@pytest.mark.parametrize("num_shots, num_queries", [(-1, 2), (2, -1)])
def test_split_rejects_negative_counts(num_shots, num_queries):
    with pytest.raises(ValueError, match="must be >= 0"):
        make_task(6).split(num_shots, num_queries, seed=0)


def test_split_rejects_non_int_seed():
    with pytest.raises(TypeError, match="seed must be an int"):
        make_task(6).split(1, 1, seed="0")


# JSONL and datasets


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_load_jsonl_generative_and_multiple_choice(tmp_path):
    path = write_jsonl(
        tmp_path / "colors.jsonl",
        [
            {"input": "sky?", "output": "blue", "id": 7},
            "",
            {"input": "grass?", "options": ["red", "green"], "answer": 1},
            {"input": "snow?", "options": ["white", "black"], "answer": "white"},
        ],
    )
    task = load_jsonl_task(path)
    assert task.name == "colors"
    assert task.examples == [
        Example("sky?", "blue"),
        Example("grass?", "green", options=("red", "green")),
        Example("snow?", "white", options=("white", "black")),
    ]
    assert task.metric == "generative"
    assert load_jsonl_task(path, name="mine").name == "mine"


def test_load_jsonl_drops_exact_duplicates(tmp_path):
    record = {"input": "sky?", "output": "blue"}
    path = write_jsonl(tmp_path / "t.jsonl", [record, record, {"input": "sea?", "output": "blue"}])
    assert [example.input for example in load_jsonl_task(path).examples] == ["sky?", "sea?"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        (json.dumps(["q", "a"]), "line 2: expected an object"),
        (json.dumps({"output": "a"}), "line 2: missing 'input'"),
        (json.dumps({"input": "q", "outptu": "a"}), r"line 2: missing 'output' \(keys present: \['input', 'outptu'\]"),
        (json.dumps({"input": "q", "output": "a", "answer": 0}), "line 2: give either 'output' or"),
        (json.dumps({"input": "q", "options": ["a"]}), "line 2: .*'answer' is missing"),
        (json.dumps({"input": "q", "options": "ab", "answer": 0}), "line 2: 'options' must be a list"),
        (json.dumps({"input": "q", "options": ["a", "b"], "answer": 2}), "line 2: 'answer' index 2 is out of range"),
        (json.dumps({"input": "q", "options": ["a", "b"], "answer": -1}), "line 2: 'answer' index -1"),
        (json.dumps({"input": "q", "options": ["a", "b"], "answer": True}), "line 2: 'answer' must be"),
        (json.dumps({"input": "q", "options": ["a", "b"], "answer": "c"}), "line 2: .*not one of the options"),
        (json.dumps({"input": "q", "output": ""}), "line 2: .*blank"),
        (json.dumps({"input": 5, "output": "a"}), "line 2: .*input must be a string"),
    ],
)
def test_load_jsonl_errors_name_the_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "t.jsonl", [{"input": "q", "output": "a"}, bad_line])
    with pytest.raises(ValueError, match=message):
        load_jsonl_task(path)


def test_load_jsonl_rejects_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no records"):
        load_jsonl_task(path)


class FakeDataset:
    """Duck-typed stand-in for `datasets.Dataset`: iterating yields dict rows."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_task_from_dataset():
    dataset = FakeDataset(
        [{"input": "q1", "output": "a1", "extra": 1}, {"input": "q2", "options": ["x", "y"], "answer": 0}]
    )
    task = task_from_dataset(dataset, "mine")
    assert task.name == "mine"
    assert task.examples == [Example("q1", "a1"), Example("q2", "x", options=("x", "y"))]


def test_task_from_dataset_errors():
    with pytest.raises(ValueError, match="mine row 1: missing 'input'"):
        task_from_dataset(FakeDataset([{"input": "q", "output": "a"}, {"question": "q"}]), "mine")
    with pytest.raises(TypeError, match=r"dataset\['train'\]"):
        task_from_dataset({"train": FakeDataset([])}, "mine")
    with pytest.raises(TypeError, match="iterable of dict rows, got int"):
        task_from_dataset(42, "mine")
    with pytest.raises(ValueError, match="has no rows"):
        task_from_dataset(FakeDataset([]), "mine")


# Splits


def test_splits_are_consistent():
    splits = load_splits()
    train_families, dev_families = set(splits["train_families"]), set(splits["dev_families"])
    assert train_families and dev_families and not train_families & dev_families
    train, dev = tasks_for_split("train"), tasks_for_split("dev")
    assert train == splits["train_tasks"] and dev == splits["dev_tasks"]
    assert {name.split("/")[0] for name in train} <= train_families
    assert {name.split("/")[0] for name in dev} <= dev_families


def test_tasks_for_split_returns_a_copy():
    tasks_for_split("train").clear()
    assert tasks_for_split("train")


def test_tasks_for_split_rejects_unknown_split():
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        tasks_for_split("test")


def test_check_allowed():
    train_task, dev_task = tasks_for_split("train")[0], tasks_for_split("dev")[0]
    check_allowed(train_task, "train")
    check_allowed(dev_task, "dev")
    with pytest.raises(ValueError, match="belongs to a dev family"):
        check_allowed(dev_task, "train")
    with pytest.raises(ValueError, match="belongs to a train family"):
        check_allowed(train_task, "dev")
    splits = load_splits()
    reserved = "surely_not_a_split_family/sub"
    assert "surely_not_a_split_family" not in splits["train_families"] + splits["dev_families"]
    for purpose in ("train", "dev"):
        with pytest.raises(ValueError, match="reserved for acceptance testing"):
            check_allowed(reserved, purpose)
    with pytest.raises(ValueError, match="Unknown split"):
        check_allowed(train_task, "test")
