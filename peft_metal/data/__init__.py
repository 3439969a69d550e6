"""Task data for MetaL-Prompt: BIG-bench and user tasks as `Task`s, the fixed split, and meta-training episodes."""

from .bigbench import bigbench_root, list_bigbench_tasks, load_bigbench_file, load_bigbench_task, load_bigbench_tasks
from .episodes import Episode, EpisodeSampler
from .splits import check_allowed, load_splits, tasks_for_split
from .task import Example, Task, task_family
from .user import load_jsonl_task, task_from_dataset

__all__ = [
    "Episode",
    "EpisodeSampler",
    "Example",
    "Task",
    "bigbench_root",
    "check_allowed",
    "list_bigbench_tasks",
    "load_bigbench_file",
    "load_bigbench_task",
    "load_bigbench_tasks",
    "load_jsonl_task",
    "load_splits",
    "task_family",
    "task_from_dataset",
    "tasks_for_split",
]
