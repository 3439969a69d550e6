"""`Example` and `Task`: the one in-memory shape every task source (BIG-bench, JSONL, datasets) is loaded into."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MULTIPLE_CHOICE = "multiple_choice"
GENERATIVE = "generative"


def _as_str_tuple(value: Any, field_name: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"Example.{field_name} must be a tuple of strings, got {type(value).__name__}.")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"Example.{field_name} must hold only strings, got {type(item).__name__} ({item!r}).")
    return tuple(value)


def task_family(name: str) -> str:
    """A task name's family, its first path component: data splits are made per family, so subtasks never straddle
    them."""
    return name.split("/", 1)[0]


@dataclass(frozen=True)
class Example:
    """One input with its correct answer.

    `output` is the answer to train on and show in shots; for multiple choice it is the text of the correct option,
    so every example can also be scored generatively. `alternatives` are other answers that count as correct (BIG-bench
    target lists such as "6" / "six", or options tied for the top score); scorers should accept any of `answers`.
    """

    input: str
    output: str
    options: tuple[str, ...] | None = None
    alternatives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field_name in ("input", "output"):
            value = getattr(self, field_name)
            if not isinstance(value, str):
                raise TypeError(f"Example.{field_name} must be a string, got {type(value).__name__}.")
        # An empty input is legitimate (some tasks ask only to pick the sensible option); an empty answer is not.
        if not self.output.strip():
            raise ValueError("Example.output is blank: every example needs an answer.")
        # Lists are accepted for convenience and stored as tuples so examples stay hashable.
        object.__setattr__(self, "alternatives", _as_str_tuple(self.alternatives, "alternatives"))
        if any(not answer.strip() for answer in self.alternatives):
            raise ValueError("Example.alternatives contains a blank answer; drop it.")
        if self.options is None:
            return
        options = _as_str_tuple(self.options, "options")
        object.__setattr__(self, "options", options)
        if not options:
            raise ValueError("Example.options is empty: give the choices, or options=None for a generative example.")
        if len(set(options)) != len(options):
            raise ValueError(f"Example.options has duplicate choices: {list(options)!r}.")
        for answer in self.answers:
            if answer not in options:
                raise ValueError(f"Correct answer {answer!r} is not one of the options {list(options)!r}.")

    @property
    def answers(self) -> tuple[str, ...]:
        """Every answer that counts as correct, `output` first."""
        return (self.output, *self.alternatives)

    def as_shot(self) -> tuple[str, str]:
        """The (input, output) pair that shot templates and the prompt generator consume."""
        return (self.input, self.output)


def make_example(where: str, **fields: Any) -> Example:
    """Build an `Example` from file or dataset data, naming the bad record if its fields are invalid."""
    try:
        return Example(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error


def drop_duplicates(examples: list[Example], source: str) -> list[Example]:
    """Keep the first copy of each example, so a query can never also appear among its own shots."""
    unique = list(dict.fromkeys(examples))
    if len(unique) < len(examples):
        logger.info("%s: dropped %d duplicate example(s).", source, len(examples) - len(unique))
    return unique


def _check_count(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")


@dataclass
class Task:
    """A named set of examples, with the task's own input/output prefixes when its source gives them.

    Prefixes are `None` when the source gives none, leaving the choice of template to the caller.
    """

    name: str
    examples: list[Example]
    input_prefix: str | None = None
    output_prefix: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task.name must be a non-empty string, got {self.name!r}.")
        if not isinstance(self.examples, list):
            raise TypeError(f"Task.examples must be a list of Example, got {type(self.examples).__name__}.")
        if not self.examples:
            raise ValueError(f"Task {self.name!r} has no examples.")
        for index, example in enumerate(self.examples):
            if not isinstance(example, Example):
                raise TypeError(f"Task {self.name!r}: examples[{index}] is a {type(example).__name__}, not an Example.")
        for prefix_name in ("input_prefix", "output_prefix"):
            prefix = getattr(self, prefix_name)
            if prefix is not None and not isinstance(prefix, str):
                raise TypeError(f"Task.{prefix_name} must be a string or None, got {type(prefix).__name__}.")

    @property
    def metric(self) -> str:
        """`"multiple_choice"` when every example has options, else `"generative"` (exact match and token F1)."""
        if all(example.options is not None for example in self.examples):
            return MULTIPLE_CHOICE
        return GENERATIVE

    @property
    def family(self) -> str:
        """The task's family (`task_family` of its name)."""
        return task_family(self.name)

    def split(self, num_shots: int, num_queries: int, seed: int) -> tuple[list[Example], list[Example]]:
        """Draw `num_shots` shots and `num_queries` queries, disjoint and reproducible for a given seed.

        Disjoint so a query is never answered by copying one of its own shots.
        """
        _check_count(num_shots, "num_shots")
        _check_count(num_queries, "num_queries")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        needed = num_shots + num_queries
        if needed > len(self.examples):
            raise ValueError(
                f"Task {self.name!r} has {len(self.examples)} examples, but {num_shots} shots + {num_queries} queries "
                f"need {needed}. Ask for fewer shots or queries."
            )
        picked = random.Random(seed).sample(self.examples, needed)
        return picked[:num_shots], picked[num_shots:]
