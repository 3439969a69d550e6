"""Meta-training episodes: a task, the shots the prompt is generated from, and the queries it is trained on."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .task import Example, Task


@dataclass
class Episode:
    """One meta-training step's data, all drawn from one task and mutually disjoint.

    `xp` are the shots the prompt generator reads, `xl` the shots kept as plain in-context demonstrations, and
    `queries` the examples the loss is computed on.
    """

    task_name: str
    xp: list[Example]
    xl: list[Example]
    queries: list[Example]


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
        self.num_queries = num_queries
        self.seed = seed
        self.step = 0

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
        task = self.tasks[rng.randrange(len(self.tasks))]
        num_xp = rng.randint(*self.xp_range)
        num_xl = rng.randint(*self.xl_range)
        shots, queries = task.split(num_xp + num_xl, self.num_queries, seed=rng.getrandbits(64))
        return Episode(task.name, xp=shots[:num_xp], xl=shots[num_xp:], queries=queries)

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
        }

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream, plus the settings it is only valid for (JSON-serialisable)."""
        return {"step": self.step, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses a state saved with other settings, whose episodes would differ."""
        settings = self._settings()
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

