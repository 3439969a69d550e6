"""Task data for MetaL-Prompt: MetaICL, BIG-bench-format and user tasks as `Task`s, the splits, and meta-training
episodes."""

from .bigbench import bigbench_root, list_bigbench_tasks, load_bigbench_file, load_bigbench_task, load_bigbench_tasks
from .episodes import Episode, EpisodeSampler
from .metaicl import MetaICLTask, load_metaicl_pool, load_metaicl_splits, load_metaicl_task, load_metaicl_tasks
from .splits import check_allowed, load_splits, tasks_for_split
from .task import Example, Task, task_family
from .user import load_jsonl_task, task_from_dataset

__all__ = [
    "Episode",
    "EpisodeSampler",
    "Example",
    "MetaICLTask",
    "Task",
    "bigbench_root",
    "check_allowed",
    "list_bigbench_tasks",
    "load_bigbench_file",
    "load_bigbench_task",
    "load_bigbench_tasks",
    "load_jsonl_task",
    "load_metaicl_pool",
    "load_metaicl_splits",
    "load_metaicl_task",
    "load_metaicl_tasks",
    "load_splits",
    "task_family",
    "task_from_dataset",
    "tasks_for_split",
]
