"""Meta-training episodes: a task, the shots the prompt is generated from, and the queries it is trained on."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .task import Example, Task

# "task": every task equally likely; "family": every family equally likely, then a task of it (BIG-bench's train split
# has 74 multiemo subtasks of 225 tasks, all one 4-label sentiment task, which "task" draws a third of the time).
TASK_SAMPLINGS = ("task", "family")

# How an episode's queries are drawn. "random": any of the task's other examples, so a task's label frequencies are
# its queries'; "balanced": in a classification task (one set of 2 to `MAX_SYMBOL_LABELS` labels shared by every
# example) the labels take turns, so a prompt that leans the LM towards the task's commonest label gains nothing on
# the loss, as it gains nothing on macro-F1. Tasks without such a label set draw at random either way.
QUERY_SAMPLINGS = ("random", "balanced")

# Arbitrary words that stand in for a classification task's labels in a symbol-label episode (symbol tuning, Wei et
# al. 2023): the answer then follows only from the shots, so a prompt that ignores them cannot score.
SYMBOL_LABELS = (
    "apple", "river", "stone", "cloud", "piano", "tiger", "candle", "forest", "bottle", "garden", "mirror", "rocket",
    "pencil", "island", "jacket", "window", "ladder", "carpet", "violin", "hammer", "button", "castle", "dragon",
    "engine", "feather", "glove", "helmet", "kettle", "lemon", "magnet", "needle", "orange", "parrot", "ribbon",
    "saddle", "tunnel", "wagon", "zebra",
)
MAX_SYMBOL_LABELS = 10

# What a sampler state saved before these settings existed was drawn with.
SETTINGS_BEFORE_THEY_EXISTED = {
    "task_sampling": "task",
    "symbol_label_rate": 0.0,
    "foreign_shots": False,
    "query_sampling": "random",
}


@dataclass
class Episode:
    """One meta-training step's data, all drawn from one task and mutually disjoint.

    `xp` are the shots the prompt generator reads, `xl` the shots kept as plain in-context demonstrations, and
    `queries` the examples the loss is computed on. `foreign_xp`, drawn only by a sampler with `foreign_shots`, are
    as many shots of a task of another family (`foreign_task`): the prompt made from them is the one the queries
    should score worse with (the task-contrast term of meta-training).
    """

    task_name: str
    xp: list[Example]
    xl: list[Example]
    queries: list[Example]
    foreign_task: str | None = None
    foreign_xp: list[Example] = field(default_factory=list)


def _check_range(value: Any, name: str, minimum: int) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(bound, int) and not isinstance(bound, bool) for bound in value)
    ):
        raise TypeError(f"{name} must be a (low, high) pair of ints, got {value!r}.")
    low, high = value
    if not minimum <= low <= high:
        raise ValueError(f"{name} must satisfy {minimum} <= low <= high, got {value!r}.")
    return (low, high)


class EpisodeSampler:
    """An endless, seeded stream of episodes over `tasks`.

    Each step picks a task uniformly, |XP| and |XL| uniformly from their inclusive ranges, then disjoint XP, XL and
    query examples from that task. Step `n` depends only on (seed, n), so `state_dict()` is just a step counter plus
    the settings, and a resumed run sees exactly the episodes an uninterrupted one would.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        xp_range: tuple[int, int] = (4, 16),
        xl_range: tuple[int, int] = (0, 4),
        num_queries: int = 4,
        seed: int = 0,
        task_sampling: str = "task",
        symbol_label_rate: float = 0.0,
        foreign_shots: bool = False,
        query_sampling: str = "random",
    ) -> None:
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("EpisodeSampler needs at least one task.")
        for index, task in enumerate(self.tasks):
            if not isinstance(task, Task):
                raise TypeError(f"tasks[{index}] is a {type(task).__name__}, not a Task.")
        names = [task.name for task in self.tasks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"Tasks must be distinct, but these names appear more than once: {repeated}.")
        self.xp_range = _check_range(xp_range, "xp_range", minimum=1)
        self.xl_range = _check_range(xl_range, "xl_range", minimum=0)
        if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1:
            raise ValueError(f"num_queries must be a positive int, got {num_queries!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        if task_sampling not in TASK_SAMPLINGS:
            raise ValueError(f"task_sampling must be one of {TASK_SAMPLINGS}, got {task_sampling!r}.")
        if isinstance(symbol_label_rate, bool) or not isinstance(symbol_label_rate, (int, float)) or not 0 <= symbol_label_rate <= 1:
            raise ValueError(f"symbol_label_rate must be a probability in [0, 1], got {symbol_label_rate!r}.")
        if query_sampling not in QUERY_SAMPLINGS:
            raise ValueError(f"query_sampling must be one of {QUERY_SAMPLINGS}, got {query_sampling!r}.")
        self.num_queries = num_queries
        self.seed = seed
        self.query_sampling = query_sampling
        # Only a sampler that balances its queries groups every task's examples by label.
        self._by_label = {task.name: examples_by_label(task) for task in self.tasks} if query_sampling == "balanced" else {}
        self.task_sampling = task_sampling
        self.symbol_label_rate = float(symbol_label_rate)
        self.step = 0
        families: dict[str, list[Task]] = {}
        for task in self.tasks:
            families.setdefault(task.family, []).append(task)
        self._families = list(families.values())
        if not isinstance(foreign_shots, bool):
            raise TypeError(f"foreign_shots must be a bool, got {type(foreign_shots).__name__}.")
        if foreign_shots and len(self._families) < 2:
            raise ValueError(
                f"foreign_shots draws each episode's foreign shots from another task family, but the tasks are all of "
                f"family {self.tasks[0].family!r}: add tasks of another family or set foreign_shots to False."
            )
        self.foreign_shots = foreign_shots
        # Only a sampler that renames labels scans every example of every task for them.
        self._relabelable = {task.name for task in self.tasks if has_fixed_labels(task)} if self.symbol_label_rate else set()

        needed = self.xp_range[1] + self.xl_range[1] + num_queries
        too_small = [f"{task.name} ({len(task.examples)})" for task in self.tasks if len(task.examples) < needed]
        if too_small:
            raise ValueError(
                f"Every task needs at least {needed} examples ({self.xp_range[1]} XP + {self.xl_range[1]} XL + "
                f"{num_queries} queries), but these have fewer: {', '.join(too_small)}. Drop them or lower "
                f"xp_range, xl_range or num_queries."
            )

    def episode(self, step: int) -> Episode:
        """The episode at `step`, the same every time for a given seed."""
        # A string seed is hashed with SHA-512, so the stream is stable across processes and Python versions.
        rng = random.Random(f"{self.seed}:{step}")
        if self.task_sampling == "family":
            family = self._families[rng.randrange(len(self._families))]
            task = family[rng.randrange(len(family))]
        else:
            task = self.tasks[rng.randrange(len(self.tasks))]
        num_xp = rng.randint(*self.xp_range)
        num_xl = rng.randint(*self.xl_range)
        if self._by_label.get(task.name):
            shots, _ = task.split(num_xp + num_xl, 0, seed=rng.getrandbits(64))
            queries = balanced_queries(self._by_label[task.name], shots, self.num_queries, rng)
        else:
            shots, queries = task.split(num_xp + num_xl, self.num_queries, seed=rng.getrandbits(64))
        episode = Episode(task.name, xp=shots[:num_xp], xl=shots[num_xp:], queries=queries)
        # Drawn only when the setting is on, so the episodes of runs without it are those they always were.
        if self.symbol_label_rate and task.name in self._relabelable and rng.random() < self.symbol_label_rate:
            episode = with_symbol_labels(episode, rng)
        if self.foreign_shots:
            episode = self._with_foreign_shots(episode, task.family, rng)
        return episode

    def _with_foreign_shots(self, episode: Episode, family: str, rng: random.Random) -> Episode:
        """As many shots as XP has, of a task drawn from any other family (a task of the same family, one of the 74
        multiemo subtasks say, can be the same task in all but name)."""
        others = [tasks for tasks in self._families if tasks[0].family != family]
        tasks = others[rng.randrange(len(others))]
        task = tasks[rng.randrange(len(tasks))]
        shots, _ = task.split(len(episode.xp), 0, seed=rng.getrandbits(64))
        return replace(episode, foreign_task=task.name, foreign_xp=shots)

    def __iter__(self) -> EpisodeSampler:
        return self

    def __next__(self) -> Episode:
        episode = self.episode(self.step)
        self.step += 1
        return episode

    def _settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "xp_range": list(self.xp_range),
            "xl_range": list(self.xl_range),
            "num_queries": self.num_queries,
            "task_names": [task.name for task in self.tasks],
            "task_sampling": self.task_sampling,
            "symbol_label_rate": self.symbol_label_rate,
            "foreign_shots": self.foreign_shots,
            "query_sampling": self.query_sampling,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream, plus the settings it is only valid for (JSON-serialisable)."""
        return {"step": self.step, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses a state saved with other settings, whose episodes would differ."""
        settings = self._settings()
        state = {**SETTINGS_BEFORE_THEY_EXISTED, **state}  # a state saved before these settings were added
        missing = [key for key in ("step", *settings) if key not in state]
        if missing:
            raise ValueError(f"Sampler state lacks {missing}; pass a dict made by EpisodeSampler.state_dict().")
        mismatched = [key for key, expected in settings.items() if state[key] != expected]
        if mismatched:
            raise ValueError(
                f"Sampler state was saved with different {', '.join(mismatched)}; resuming would change the episodes. "
                f"Build the sampler with the settings of the saved run."
            )
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"Sampler state has an invalid 'step': {step!r}.")
        self.step = step


def examples_by_label(task: Task) -> dict[str, list[Example]] | None:
    """`task`'s examples grouped by their answer, in the order of its label set; None where the examples do not all
    share one set of 2 to `MAX_SYMBOL_LABELS` options (generation, or multiple choice whose options change)."""
    option_sets = {None if example.options is None else frozenset(example.options) for example in task.examples}
    labels = task.examples[0].options
    if len(option_sets) != 1 or labels is None or not 2 <= len(labels) <= MAX_SYMBOL_LABELS:
        return None
    groups: dict[str, list[Example]] = {label: [] for label in labels}
    for example in task.examples:
        groups[example.output].append(example)
    return groups


def balanced_queries(
    groups: dict[str, list[Example]], shots: list[Example], num_queries: int, rng: random.Random
) -> list[Example]:
    """`num_queries` examples outside `shots`, the labels taking turns in a random order (a label with no example
    left drops out of the turns)."""
    taken = {id(shot) for shot in shots}
    left = {label: [e for e in examples if id(e) not in taken] for label, examples in groups.items()}
    turns = [label for label in rng.sample(list(left), len(left)) if left[label]]
    queries: list[Example] = []
    while len(queries) < num_queries:
        if not turns:
            raise ValueError(f"Only {len(queries)} examples are left outside the shots; {num_queries} queries were asked.")
        for label in list(turns)[: num_queries - len(queries)]:
            queries.append(left[label].pop(rng.randrange(len(left[label]))))
            if not left[label]:
                turns.remove(label)
    return queries


def has_fixed_labels(task: Task) -> bool:
    """Whether `task` is a classification task whose labels can be renamed: every example has the same 2 to
    `MAX_SYMBOL_LABELS` options, and the inputs do not list them (half of them or more naming every option would)."""
    groups = examples_by_label(task)
    if groups is None:
        return False
    words = [re.compile(rf"\b{re.escape(label)}\b", re.IGNORECASE) for label in groups]
    listing = sum(all(word.search(example.input) for word in words) for example in task.examples)
    return listing < len(task.examples) / 2


def with_symbol_labels(episode: Episode, rng: random.Random) -> Episode:
    """`episode` with each label renamed to an arbitrary word, the same renaming in its shots and its queries."""
    labels = sorted(episode.queries[0].options)
    renamed = dict(zip(labels, rng.sample(SYMBOL_LABELS, len(labels))))

    def rename(example: Example) -> Example:
        return replace(
            example,
            output=renamed[example.output],
            options=tuple(renamed[option] for option in example.options),
            alternatives=tuple(renamed[answer] for answer in example.alternatives),
        )

    return Episode(
        episode.task_name,
        xp=[rename(e) for e in episode.xp],
        xl=[rename(e) for e in episode.xl],
        queries=[rename(e) for e in episode.queries],
    )


def task_with_symbol_labels(task: Task, rng: random.Random) -> Task:
    """`task` with its labels renamed as a symbol-label episode renames them, one renaming for every example: a task
    whose answers only its shots can tell, to measure whether a prompt carries what they show."""
    if not has_fixed_labels(task):
        raise ValueError(
            f"{task.name} is not a classification task with one fixed set of 2 to {MAX_SYMBOL_LABELS} labels that its "
            "inputs do not list, so its labels cannot be renamed; pick such a task."
        )
    renamed = with_symbol_labels(Episode(task.name, xp=[], xl=[], queries=list(task.examples)), rng)
    return replace(task, examples=renamed.queries)
