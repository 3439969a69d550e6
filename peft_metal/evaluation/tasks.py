"""Which tasks an evaluation may use, and loading them.

BIG-bench families in neither split of `bigbench_splits.json` are reserved for acceptance testing: evaluation refuses
them with the split guard's own message. Dev families are what evaluation is for; train families are allowed too (to
look at in-distribution scores). Tasks from a user folder (`task_dir`) whose family is not a BIG-bench family are the
user's own and are not guarded.
"""

from __future__ import annotations

import difflib
import os
from typing import Optional, Sequence

from ..data import Task, check_allowed, load_bigbench_task, load_splits, tasks_for_split
from ..data.bigbench import bigbench_root


def _bigbench_families() -> Optional[set[str]]:
    """Families of the installed BIG-bench package, or None when it is not installed."""
    try:
        root = bigbench_root()
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    return {path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("_")}


def check_eval_task(name: str, task_dir: Optional[str | os.PathLike] = None) -> None:
    """Raise (with the split guard's message) if `name` belongs to a family reserved for acceptance testing."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Task names must be non-empty strings, got {name!r}.")
    splits = load_splits()
    family = name.split("/", 1)[0]
    if family in splits["train_families"] or family in splits["dev_families"]:
        return
    if task_dir is not None:
        families = _bigbench_families()
        if families is None or family not in families:
            return  # the user's own task, not a BIG-bench one
    try:
        check_allowed(name, "dev")
    except ValueError as error:
        families = _bigbench_families()
        if task_dir is None and (families is None or family not in families):  # a typo for an allowed task?
            allowed = tasks_for_split("dev") + tasks_for_split("train")
            close = difflib.get_close_matches(name, allowed, n=3)
            if close:
                raise ValueError(f"{error} (Did you mean: {', '.join(close)}?)") from None
        raise


def parse_task_names(names: str | Sequence[str]) -> list[str]:
    if isinstance(names, str):
        names = names.split(",")
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError("No task names given.")
    return list(dict.fromkeys(names))


def load_eval_tasks(
    names: str | Sequence[str] | None = None,
    split: Optional[str] = None,
    task_dir: Optional[str | os.PathLike] = None,
) -> list[Task]:
    """The named tasks (comma-separated string or list) or those of a split (`"dev"` or `"train"`), guarded and
    loaded from `task_dir` (a folder of BIG-bench JSON tasks) or the installed BIG-bench package."""
    if (names is None) == (split is None):
        raise ValueError("Give either task names or a split, not both and not neither.")
    names = parse_task_names(names) if names is not None else tasks_for_split(split)
    for name in names:
        check_eval_task(name, task_dir)
    return [load_bigbench_task(name, root=task_dir) for name in names]
