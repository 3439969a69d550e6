"""`EvaluationSettings`: what an evaluation run does, checked once where it enters (`evaluate`'s keywords, the CLI's
flags), as `TrainingArguments` is for meta-training. Everything after takes it as given."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..data.task import GENERATIVE, MULTIPLE_CHOICE
from ..inference.calibration import CALIBRATIONS
from .baselines import BASELINE_METHODS, BaselineOptions
from .methods import (
    DEFAULT_NUM_DEMONSTRATIONS,
    DEFAULT_REFINE_BATCH_SIZE,
    DEFAULT_REFINE_LR,
    DEFAULT_REFINE_STEPS,
    DEMONSTRATION_METHODS,
    PGM_METHODS,
    REFINE_METHODS,
    resolve_methods,
)

DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_SHOTS = 16  # MetaICL's k: the shots every panel draws unless told otherwise
METRICS = (MULTIPLE_CHOICE, GENERATIVE)


def check_count(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def resolve_refine_steps(refine_steps: Any) -> list[int]:
    """Refinement step counts as a list of distinct ints >= 0 (an int, a sequence, or a string like "0,5,10")."""
    if isinstance(refine_steps, str):
        try:
            refine_steps = [int(part) for part in refine_steps.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"refine_steps must be comma-separated ints, got {refine_steps!r}.") from None
    steps = [refine_steps] if isinstance(refine_steps, int) and not isinstance(refine_steps, bool) else list(refine_steps)
    if not steps:
        raise ValueError("refine_steps is empty: give at least one step count.")
    for value in steps:
        check_count(value, "refine_steps", 0)
    if len(set(steps)) != len(steps):
        raise ValueError(f"refine_steps {steps} has repeated step counts.")
    return steps


@dataclass(frozen=True)
class EvaluationSettings:
    """Methods (a list or a comma-separated string), shots per task, queries per task, and how each method runs:
    `num_demonstrations` (metal+demos), `max_new_tokens` (generative tasks), `metric` (force multiple choice or
    generative for every task), `baseline` (the PEFT baselines), `refine_*` (the refined methods; one run per step
    count), `calibration` ("shots": multiple choice also scored calibrated on the task's shots)."""

    methods: Any
    shots: int
    queries: int
    num_demonstrations: int = DEFAULT_NUM_DEMONSTRATIONS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    metric: Optional[str] = None
    baseline: BaselineOptions = field(default_factory=BaselineOptions)
    refine_steps: Any = DEFAULT_REFINE_STEPS
    refine_lr: Optional[float] = DEFAULT_REFINE_LR  # None: refine_prompt's default
    refine_batch_size: int = DEFAULT_REFINE_BATCH_SIZE
    calibration: str = "none"  # "shots": also score multiple choice calibrated on the task's shots (`calibration`)

    def __post_init__(self) -> None:
        methods = tuple(resolve_methods(self.methods))
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "refine_steps", tuple(resolve_refine_steps(self.refine_steps)))
        check_count(self.shots, "shots", 0)
        check_count(self.queries, "queries", 1)
        check_count(self.max_new_tokens, "max_new_tokens", 1)
        check_count(self.refine_batch_size, "refine_batch_size", 1)
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"Unknown metric {self.metric!r}; expected one of {list(METRICS)} (or None for the task's own).")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"Unknown calibration {self.calibration!r}; expected one of {list(CALIBRATIONS)}.")
        if self.calibration == "shots" and self.shots < 1:
            raise ValueError("calibration='shots' reads the option prior on the shots: shots must be >= 1, got 0.")
        if not isinstance(self.baseline, BaselineOptions):
            raise TypeError(f"baseline must be a BaselineOptions, got {type(self.baseline).__name__}.")
        lr = self.refine_lr
        if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0):
            raise ValueError(f"refine_lr must be a number > 0, or None for refine_prompt's default; got {lr!r}.")
        for group, verb in ((self.pgm_methods, "generate a prompt from"), (self.baseline_methods, "train on")):
            if group and self.shots < 1:
                raise ValueError(f"Methods {list(group)} {verb} the shots: shots must be >= 1, got {self.shots}.")
        for name in (name for name in methods if name in DEMONSTRATION_METHODS):
            check_count(self.num_demonstrations, "num_demonstrations", 1)
            if self.num_demonstrations >= self.shots:
                raise ValueError(
                    f"{name!r} keeps the last num_demonstrations={self.num_demonstrations} of the {self.shots} "
                    "shots as demonstrations (the metal methods give the rest to the PGM, and `demos` keeps what "
                    "metal+demos keeps): it needs shots > num_demonstrations."
                )

    @property
    def pgm_methods(self) -> tuple[str, ...]:
        return tuple(name for name in self.methods if name in PGM_METHODS)

    @property
    def baseline_methods(self) -> tuple[str, ...]:
        return tuple(name for name in self.methods if name in BASELINE_METHODS)

    @property
    def runs(self) -> list[tuple[str, dict[str, Any]]]:
        """One run per method, a refined method once per step count (its records carry `refine_steps`)."""
        runs: list[tuple[str, dict[str, Any]]] = []
        for name in self.methods:
            if name in REFINE_METHODS:
                runs.extend((name, {"refine_steps": n}) for n in self.refine_steps)
            else:
                runs.append((name, {}))
        return runs

    def to_dict(self) -> dict[str, Any]:
        """What results.json records about the run: only the settings its methods use."""
        record = {
            "methods": list(self.methods), "shots": self.shots, "queries": self.queries, "metric": self.metric,
            "num_demonstrations": self.num_demonstrations, "max_new_tokens": self.max_new_tokens,
            "calibration": self.calibration,
        }
        if any(name in REFINE_METHODS for name in self.methods):
            record.update(refine_steps=list(self.refine_steps), refine_lr=self.refine_lr, refine_batch_size=self.refine_batch_size)
        if self.baseline_methods:
            record["baseline"] = dataclasses.asdict(self.baseline)
        return record
