"""Which train tasks a training benchmark draws its episodes from, named on its command line (`--episodes`).

The cost of an episode depends on its tasks' lengths, so the throughput and profile benchmarks say which they ran on:
- `metaicl`: MetaICL's class -> class train tasks ($PEFT_METAL_DATA/metaicl): short classification inputs, the
  episodes the shipped recipe now trains on;
- `tasks`: the BIG-bench-format train tasks ($PEFT_METAL_DATA/tasks/train): longer inputs and answers, the closest mix
  left to BIG-bench's, on which the earlier throughput figures were measured;
- `config`: whatever each config's own `metaicl_dir` / `task_dir` names.
"""

from __future__ import annotations

from peft_metal.data import Task
from peft_metal.data.bigbench import load_bigbench_tasks
from peft_metal.data.corpora import corpus_dir
from peft_metal.data.metaicl import load_metaicl_pool, load_metaicl_splits
from peft_metal.training import TrainingArguments
from peft_metal.training.trainer import train_tasks_of

EPISODE_SOURCES = ("metaicl", "tasks", "config")


def episode_tasks(source: str, args: TrainingArguments) -> list[Task]:
    """The train tasks of `source` that can fill an episode of `args` (MetaICL pools too small for its XP, XL and
    queries are left out, as a training config would have to leave them out)."""
    if source == "config":
        return train_tasks_of(args)
    if source == "tasks":
        return load_bigbench_tasks(None, corpus_dir("tasks") / "train")
    if source != "metaicl":
        raise ValueError(f"--episodes must be one of {EPISODE_SOURCES}, got {source!r}.")
    root = corpus_dir("metaicl")
    needed = args.xp_range[1] + args.xl_range[1] + args.num_queries
    pools = [load_metaicl_pool(root, name) for name in load_metaicl_splits(root)["class_to_class_train"]]
    return [pool for pool in pools if len(pool.examples) >= needed]
