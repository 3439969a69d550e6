"""MetaICL's preprocessed tasks (Min et al. 2022), in MetaICL's own layout, as `Task`s.

A MetaICL data folder holds `data/<task>/<task>_<k>_<seed>_<split>.jsonl` (one `{"task", "input", "output",
"options"}` record per line) and, beside `data/`, `splits.json` naming the `train` and `dev` tasks:

* `<task>_16_<seed>_train.jsonl`: the k=16 demonstrations of one seed (MetaICL's seeds: 100, 13, 21, 42, 87);
* `<task>_16_100_test.jsonl`: the test queries of an evaluation task;
* `<task>_16384_100_train.jsonl`: a train task's pool for meta-training.

Meta-training draws episodes from a task's pool (`load_metaicl_pool`); MetaICL's evaluation protocol gives, per seed,
that seed's demonstrations as the shots and a fixed draw of the test file as the queries (`MetaICLTask.split`). Nothing
falls back to another seed or task: a missing one is an error that names what exists.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .task import Example, Task, drop_duplicates
from .user import example_from_record, read_jsonl

MEMBERS = ("train", "dev")
DEMONSTRATIONS = 16  # MetaICL's k
SEEDS = (100, 13, 21, 42, 87)  # MetaICL's seeds, in its order
POOL_K, POOL_SEED = 16384, 100  # the name MetaICL gives its meta-training files
TEST_SEED = 100  # the one test file of an evaluation task
_FILE_NAME = re.compile(r"^(?P<task>.+)_(?P<k>\d+)_(?P<seed>\d+)_(?P<split>train|dev|test)\.jsonl$")


def metaicl_data_dir(root: str | os.PathLike) -> Path:
    """The folder of task folders: `root/data` for a MetaICL data folder, or `root` itself if it holds them."""
    root = Path(root)
    if (root / "data").is_dir():
        return root / "data"
    if root.is_dir() and any(path.suffix == ".jsonl" for task in root.iterdir() if task.is_dir() for path in task.iterdir()):
        return root
    raise FileNotFoundError(
        f"{root} is not a MetaICL data folder: expected {root}/data/<task>/<task>_<k>_<seed>_<split>.jsonl files."
    )


def list_metaicl_tasks(root: str | os.PathLike) -> list[str]:
    """The names of the task folders of a MetaICL data folder."""
    return sorted(path.name for path in metaicl_data_dir(root).iterdir() if path.is_dir())


def load_metaicl_splits(root: str | os.PathLike) -> dict[str, list[str]]:
    """`splits.json` beside `data/`: which tasks are `train` (meta-training) and which `dev` (choosing, reporting)."""
    path = Path(root) / "splits.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a MetaICL data folder names its train and dev tasks there.")
    splits = json.loads(path.read_text(encoding="utf-8"))
    for member in MEMBERS:
        if not isinstance(splits.get(member), list):
            raise ValueError(f"{path}: {member!r} must list task names.")
    return splits


def check_metaicl_split(root: str | os.PathLike, names: Sequence[str], member: str) -> None:
    """Raise unless every task in `names` belongs to the `member` split of `splits.json` (meta-training only on train
    tasks; choices only on dev tasks); anything else there is reserved."""
    splits = load_metaicl_splits(root)
    allowed = set(splits[member])
    outside = [name for name in names if name not in allowed]
    if outside:
        other = "dev" if member == "train" else "train"
        wrong = [f"{name} ({other})" if name in splits[other] else f"{name} (in no split)" for name in outside]
        raise ValueError(
            f"{', '.join(wrong)}: {member} may only use the {member} tasks of {Path(root) / 'splits.json'}."
        )


def read_metaicl_file(path: str | os.PathLike) -> list[Example]:
    """The examples of one MetaICL JSONL file; a malformed line raises naming the file and the line.

    A record with `options` is multiple choice (its `output` must be one of them; an option listed twice is kept
    once); one whose `options` is empty is generative.
    """
    path = Path(path)
    examples = [_example(record, where) for where, record in read_jsonl(path)]
    if not examples:
        raise ValueError(f"{path} holds no records.")
    return examples


def _example(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object {{'task', 'input', 'output', 'options'}}, got {type(record).__name__}.")
    missing = [key for key in ("input", "output", "options") if key not in record]
    if missing:
        raise ValueError(f"{where}: missing {missing}; MetaICL records have 'task', 'input', 'output' and 'options'.")
    options = record["options"]
    if isinstance(options, list) and all(isinstance(option, str) for option in options):
        # A few of MetaICL's records list an option twice (commonsense_qa); the copy scores the same, so it is dropped.
        options = list(dict.fromkeys(options))
    return example_from_record({"input": record["input"], "output": record["output"], "options": options}, where)


def _task_folder(root: str | os.PathLike, task: str) -> Path:
    folder = metaicl_data_dir(root) / task
    if not folder.is_dir():
        raise ValueError(f"No MetaICL task {task!r} in {folder.parent}; it has: {', '.join(list_metaicl_tasks(root))}.")
    return folder


def _files(folder: Path) -> dict[tuple[int, int, str], Path]:
    files = {}
    for path in folder.iterdir():
        match = _FILE_NAME.match(path.name)
        if match and match["task"] == folder.name:
            files[(int(match["k"]), int(match["seed"]), match["split"])] = path
    return files


def _seeds_in(files: dict[tuple[int, int, str], Path], k: int) -> list[int]:
    found = {seed for (file_k, seed, split) in files if file_k == k and split == "train"}
    return [seed for seed in SEEDS if seed in found] + sorted(found - set(SEEDS))


def metaicl_seeds(root: str | os.PathLike, task: str, k: int = DEMONSTRATIONS) -> list[int]:
    """The seeds for which `task` has k demonstrations, in MetaICL's order first."""
    return _seeds_in(_files(_task_folder(root, task)), k)


def load_metaicl_pool(root: str | os.PathLike, task: str) -> Task:
    """Every example of `task` to draw meta-training episodes from: its pool (`<task>_16384_100_train.jsonl`), or,
    for a task without one (an evaluation task, for a dev loss), its k=16 files of every seed, duplicates dropped."""
    folder = _task_folder(root, task)
    files = _files(folder)
    pool = files.get((POOL_K, POOL_SEED, "train"))
    paths = [pool] if pool else [path for (k, _, split), path in sorted(files.items()) if k != POOL_K and split in MEMBERS]
    if not paths:
        raise ValueError(f"{folder} has neither a pool ({task}_{POOL_K}_{POOL_SEED}_train.jsonl) nor k-shot files.")
    examples = [example for path in paths for example in read_metaicl_file(path)]
    return Task(task, drop_duplicates(examples, str(folder)))


@dataclass
class MetaICLTask(Task):
    """An evaluation task under MetaICL's protocol: `examples` are the test queries, `demonstrations` the k given
    demonstrations of each seed. `split(num_shots, num_queries, seed)` returns that seed's demonstrations and a fixed
    draw of at most `num_queries` test queries (all of them if there are fewer), the same for a seed every time."""

    demonstrations: dict[int, list[Example]] = field(default_factory=dict)

    def split(self, num_shots: int, num_queries: int, seed: int) -> tuple[list[Example], list[Example]]:
        if seed not in self.demonstrations:
            raise ValueError(
                f"MetaICL task {self.name!r} has no demonstrations for seed {seed}; it has seeds "
                f"{', '.join(map(str, self.demonstrations))}."
            )
        shots = self.demonstrations[seed]
        if not isinstance(num_shots, int) or not 0 <= num_shots <= len(shots):
            raise ValueError(
                f"MetaICL task {self.name!r} gives {len(shots)} demonstrations for seed {seed}; asked for {num_shots} "
                "shots. Ask for at most that many."
            )
        if not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries must be a positive int, got {num_queries!r}.")
        draw = random.Random(f"{self.name}:{seed}").sample(self.examples, min(num_queries, len(self.examples)))
        return shots[:num_shots], draw


def load_metaicl_task(
    root: str | os.PathLike, task: str, seeds: Sequence[int] = SEEDS, k: int = DEMONSTRATIONS
) -> MetaICLTask:
    """`task` under MetaICL's protocol: each seed's k demonstrations and the test queries (`<task>_16_100_test.jsonl`).

    A seed without its k demonstrations, or a task without a test file, raises naming what exists."""
    folder = _task_folder(root, task)
    files = _files(folder)
    available = _seeds_in(files, k)
    missing = [seed for seed in seeds if (k, seed, "train") not in files]
    if missing:
        have = ", ".join(map(str, available)) or "none"
        raise ValueError(
            f"MetaICL task {task!r} has no k={k} demonstrations for seed(s) {', '.join(map(str, missing))} "
            f"({folder}); its k={k} seeds are: {have}."
        )
    test = files.get((k, TEST_SEED, "test"))
    if test is None:
        raise ValueError(
            f"MetaICL task {task!r} has no test file ({task}_{k}_{TEST_SEED}_test.jsonl in {folder}): it is a "
            "meta-training task, not an evaluation task."
        )
    demonstrations = {seed: read_metaicl_file(files[(k, seed, "train")]) for seed in seeds}
    for seed, shots in demonstrations.items():
        if len(shots) != k:
            raise ValueError(f"{files[(k, seed, 'train')]} holds {len(shots)} demonstrations, not k={k}.")
    return MetaICLTask(task, read_metaicl_file(test), demonstrations=demonstrations)


def load_metaicl_tasks(
    root: str | os.PathLike, names: Sequence[str], seeds: Sequence[int] = SEEDS, k: int = DEMONSTRATIONS
) -> list[MetaICLTask]:
    """`load_metaicl_task` for each name."""
    if isinstance(names, str):
        raise TypeError(f"names must be a list of task names, got the string {names!r}.")
    return [load_metaicl_task(root, name, seeds, k) for name in names]
