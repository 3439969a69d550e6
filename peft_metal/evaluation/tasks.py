"""Which tasks an evaluation may use, and loading them.

Evaluation may run any task: a MetaICL task under MetaICL's protocol (`metaicl_dir`), a folder of the user's own
BIG-bench-format tasks (`task_dir`), a BIG-bench task of a clone's folders, or a split (`"dev"`, `"train"`) of MetaICL's
`splits.json` or of `bigbench_splits.json`. The split guard belongs to meta-training and to the choices made on dev
(the trainer, its dev loss, the dev panels), not here. Only a name that matches no task is refused, with close matches.
"""

from __future__ import annotations

import difflib
import os
from typing import Optional, Sequence

from ..data import Task, load_bigbench_tasks, tasks_for_split
from ..data.bigbench import bigbench_root
from ..data.corpora import corpus_dir
from ..data.metaicl import DEMONSTRATIONS, SEEDS, check_metaicl_split, load_metaicl_splits, load_metaicl_tasks
from .panels import BIGBENCH, METAICL, Panel


def _bigbench_families() -> Optional[set[str]]:
    """Families of the installed BIG-bench package, or None when it is not installed."""
    try:
        root = bigbench_root()
    except FileNotFoundError:
        return None
    return {path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("_")}


def check_eval_task(name: str, task_dir: Optional[str | os.PathLike] = None) -> None:
    """Raise if `name` is not a task evaluation can find, suggesting close matches; any real task passes."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Task names must be non-empty strings, got {name!r}.")
    if task_dir is not None:
        return  # the loader names what is missing from the user's folder
    families = _bigbench_families()
    family = name.split("/", 1)[0]
    if families is None or family in families:
        return  # without the bigbench package the loader says how to install it
    known = sorted(set(tasks_for_split("dev") + tasks_for_split("train")) | families)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"No BIG-bench task family {family!r} is installed.{hint}")


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
    metaicl_dir: Optional[str | os.PathLike] = None,
    seeds: Sequence[int] = SEEDS,
    shots: int = DEMONSTRATIONS,
) -> list[Task]:
    """The named tasks (comma-separated string or list) or those of a split (`"dev"` or `"train"`): MetaICL tasks of
    `metaicl_dir` under MetaICL's protocol for `seeds` (its files of k=`shots` demonstrations), or BIG-bench-format tasks of `task_dir` (default: BIG-bench's
    folders, `$PEFT_METAL_BIGBENCH_TASKS`)."""
    if (names is None) == (split is None):
        raise ValueError("Give either task names or a split, not both and not neither.")
    if metaicl_dir is not None:
        if task_dir is not None:
            raise ValueError("Give a MetaICL data folder or a folder of BIG-bench-format tasks, not both.")
        names = parse_task_names(names) if names is not None else load_metaicl_splits(metaicl_dir)[split]
        return load_metaicl_tasks(metaicl_dir, names, seeds, shots)
    names = parse_task_names(names) if names is not None else tasks_for_split(split)
    for name in names:
        check_eval_task(name, task_dir)
    return load_bigbench_tasks(names, task_dir)


def load_panel_tasks(panel: Panel, folder: Optional[str | os.PathLike] = None) -> list[Task]:
    """A panel's tasks, from `folder` (a MetaICL data folder, or a folder of BIG-bench-format dev tasks) or else from
    `$PEFT_METAL_DATA` (BIG-bench's own panels: a clone's task folders); MetaICL tasks must be dev tasks of its split."""
    if panel.source == METAICL:
        folder = folder if folder is not None else corpus_dir(METAICL)
        check_metaicl_split(folder, panel.tasks, "dev")
        return load_metaicl_tasks(folder, panel.tasks, panel.seeds, panel.shots)
    if panel.source == BIGBENCH:
        return load_bigbench_tasks(list(panel.tasks), folder)
    return load_bigbench_tasks(list(panel.tasks), folder if folder is not None else corpus_dir(panel.source) / "dev")
