"""The fixed BIG-bench split: which families meta-training may see, which are for tuning and reporting.

Every family in neither list is reserved for acceptance testing; `check_allowed` is the guard that keeps it out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .task import task_family

SPLITS_FILE = Path(__file__).with_name("bigbench_splits.json")
SPLITS = ("train", "dev")
REQUIRED_KEYS = ("train_families", "dev_families", "train_tasks", "dev_tasks")


def load_splits() -> dict[str, Any]:
    """The package's own `bigbench_splits.json`: `train_families`, `dev_families`, `train_tasks`, `dev_tasks`."""
    with SPLITS_FILE.open(encoding="utf-8") as file:
        splits = json.load(file)
    missing = [key for key in REQUIRED_KEYS if key not in splits]
    if missing:
        raise ValueError(f"{SPLITS_FILE} lacks {missing}; restore the file shipped with peft-metal.")
    return splits


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLITS)}.")


def tasks_for_split(split: str) -> list[str]:
    """The task names (`family` or `family/subtask`) of the `"train"` or `"dev"` split."""
    _check_split(split)
    return list(load_splits()[f"{split}_tasks"])


def check_allowed(task_name: str, purpose: str) -> None:
    """Raise unless `task_name`'s family may be used for `purpose`.

    `"train"` (meta-training) may only use train families; `"dev"` (tuning, checkpoint selection, reporting) only dev
    families. Families in neither are reserved for acceptance testing and refused for both.
    """
    _check_split(purpose)
    if not isinstance(task_name, str) or not task_name:
        raise ValueError(f"task_name must be a non-empty string, got {task_name!r}.")
    splits = load_splits()
    family = task_family(task_name)
    if family in splits[f"{purpose}_families"]:
        return
    for other in SPLITS:
        if family in splits[f"{other}_families"]:
            raise ValueError(
                f"Task {task_name!r} belongs to a {other} family ({family!r}); {purpose} may only use "
                f"{purpose} families."
            )
    raise ValueError(
        f"Task {task_name!r} belongs to family {family!r}, which is reserved for acceptance testing: never train, "
        f"tune or select checkpoints on it."
    )
