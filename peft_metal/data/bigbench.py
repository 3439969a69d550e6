"""Load BIG-bench JSON tasks (`<root>/<family>/task.json` or `<root>/<family>/<subtask>/task.json`) as `Task`s.

How the file format maps onto `Example`:

* `target_scores` ({option: score}) makes a multiple-choice example: the options in file order, the first top-scored
  option as `output`, other top-scored options (ties, e.g. "3" and "three") as `alternatives`. A `target` next to
  `target_scores` is ignored: it is either the same answer or a rationale (strategyqa).
* `target` (a string, or a list of acceptable answers) makes a generative example: the first answer as `output`, the
  rest, de-duplicated, as `alternatives`. Blank answers are dropped; an example left with none carries nothing to learn
  or score and is skipped with a warning (a few BIG-bench files hold such blank records).
* `example_input_prefix` / `example_output_prefix` become the task's prefixes, `None` where the file gives none.
  `task_prefix` (a fixed instruction) is not kept: the generated prompt is what stands in for it.
* Exact duplicate examples are dropped, so shots and queries drawn from a task cannot coincide.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import reprlib
from pathlib import Path
from typing import Any, Sequence

from .task import Example, Task, drop_duplicates, make_example

logger = logging.getLogger(__name__)

TASK_FILE = "task.json"
# Where BIG-bench's task folders are: `bigbench/benchmark_tasks` of a clone of github.com/google/BIG-bench. The
# `bigbench` package that carried them is no longer served, so nothing defaults to it.
TASKS_ENV = "PEFT_METAL_BIGBENCH_TASKS"


def bigbench_root() -> Path:
    """The folder of BIG-bench's task folders, `$PEFT_METAL_BIGBENCH_TASKS`."""
    if not os.environ.get(TASKS_ENV):
        raise FileNotFoundError(
            f"BIG-bench's task files are not here: set {TASKS_ENV} to the bigbench/benchmark_tasks folder of a clone "
            "of github.com/google/BIG-bench, or use tasks of another folder (MetaICL's: `--metaicl`, metaicl_dir; "
            "BIG-bench-format tasks of one's own: `--task-dir`, task_dir)."
        )
    root = Path(os.environ[TASKS_ENV])
    if not root.is_dir():
        raise FileNotFoundError(
            f"{TASKS_ENV}={root} is not a folder: point it at BIG-bench's folder of task folders (in a clone of "
            "github.com/google/BIG-bench, bigbench/benchmark_tasks)."
        )
    return root


def _resolve_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        return bigbench_root()
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"BIG-bench root {root} is not a folder; pass the folder that holds the task folders.")
    return root


def list_bigbench_tasks(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the loadable tasks under `root`: `family`, or `family/subtask` for every subtask of a split task."""
    root = _resolve_root(root)
    names = []
    for family in sorted(path for path in root.iterdir() if path.is_dir()):
        subtasks = sorted(path.name for path in family.iterdir() if (path / TASK_FILE).is_file())
        if subtasks:
            names.extend(f"{family.name}/{subtask}" for subtask in subtasks)
        elif (family / TASK_FILE).is_file():
            names.append(family.name)
    return names


def load_bigbench_task(name: str, root: str | os.PathLike | None = None) -> Task:
    """Load the task `name` (as listed by `list_bigbench_tasks`) from `root`, by default BIG-bench's folders."""
    return load_bigbench_tasks([name], root)[0]


def load_bigbench_tasks(names: Sequence[str] | None = None, root: str | os.PathLike | None = None) -> list[Task]:
    """Load the named tasks (every task under `root` when `names` is None) from `root`, by default BIG-bench's
    folders; the folder is listed once, however many tasks are loaded."""
    if isinstance(names, str):
        raise TypeError(f"names must be a list of task names, got the string {names!r}.")
    for name in names or ():
        if not isinstance(name, str):
            raise TypeError(f"Task name must be a string, got {type(name).__name__}.")
    root = _resolve_root(root)
    known = list_bigbench_tasks(root)
    names = known if names is None else list(names)
    if not names:
        raise ValueError(f"{root} holds no task folders (each needs a task.json, as BIG-bench's do).")
    for name in names:
        _check_known(name, known, root)
    return [load_bigbench_file(root / name / TASK_FILE, name=name) for name in names]


def _check_known(name: str, known: list[str], root: Path) -> None:
    if name not in known:
        subtasks = [known_name for known_name in known if known_name.startswith(f"{name}/")]
        if subtasks:
            raise ValueError(
                f"BIG-bench task {name!r} is split into subtasks; load one of them: {', '.join(subtasks)}."
            )
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"Did you mean: {', '.join(close)}?" if close else "See list_bigbench_tasks() for the names."
        raise ValueError(f"Unknown BIG-bench task {name!r} under {root}. {hint}")


def load_bigbench_file(path: str | os.PathLike, name: str | None = None) -> Task:
    """Load one BIG-bench `task.json` (or the folder holding it); `name` defaults to the folder's name."""
    path = Path(path)
    if path.is_dir():
        path = path / TASK_FILE
    try:
        with path.open(encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}.")
    if "examples" not in data:
        raise ValueError(
            f"{path}: has no 'examples' list. If the task is split into subtasks, load one of its subfolders."
        )
    raw_examples = data["examples"]
    if not isinstance(raw_examples, list) or not raw_examples:
        raise ValueError(f"{path}: 'examples' must be a non-empty list.")

    examples = []
    for index, raw in enumerate(raw_examples):
        example = _example_from_json(raw, f"{path}: examples[{index}]")
        if example is not None:
            examples.append(example)
    skipped = len(raw_examples) - len(examples)
    if skipped:
        logger.warning("%s: skipped %d example(s) without a non-blank target.", path, skipped)
    if not examples:
        raise ValueError(f"{path}: none of its examples has a non-blank target.")

    return Task(
        name=name or path.parent.name,
        examples=drop_duplicates(examples, str(path)),
        input_prefix=_prefix(data, "example_input_prefix", path),
        output_prefix=_prefix(data, "example_output_prefix", path),
    )


def _prefix(data: dict[str, Any], key: str, path: Path) -> str | None:
    prefix = data.get(key)
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError(f"{path}: {key!r} must be a string, got {type(prefix).__name__}.")
    return prefix


def _example_from_json(raw: Any, where: str) -> Example | None:
    """One BIG-bench example as an `Example`, or `None` for a generative example without any non-blank answer."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
    if "input" not in raw:
        raise ValueError(f"{where}: has no 'input'.")
    if "target_scores" in raw:
        return _multiple_choice(raw, where)
    if "target" in raw:
        return _generative(raw, where)
    raise ValueError(f"{where}: has neither 'target' nor 'target_scores'.")


def _multiple_choice(raw: dict[str, Any], where: str) -> Example:
    scores = raw["target_scores"]
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"{where}: 'target_scores' must be a non-empty object mapping each option to its score.")
    for option, score in scores.items():
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise ValueError(f"{where}: the score of option {option!r} must be a number, got {score!r}.")
    best = max(scores.values())
    correct = [option for option, score in scores.items() if score == best]
    return make_example(
        where, input=raw["input"], output=correct[0], options=tuple(scores), alternatives=tuple(correct[1:])
    )


def _generative(raw: dict[str, Any], where: str) -> Example | None:
    target = raw["target"]
    targets = [target] if isinstance(target, str) else target
    if not isinstance(targets, list) or not all(isinstance(answer, str) for answer in targets):
        raise ValueError(f"{where}: 'target' must be a string or a list of strings, got {reprlib.repr(target)}.")
    answers = list(dict.fromkeys(answer for answer in targets if answer.strip()))
    if not answers:
        return None
    return make_example(where, input=raw["input"], output=answers[0], alternatives=tuple(answers[1:]))
