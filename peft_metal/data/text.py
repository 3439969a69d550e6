"""Generic-text episodes for the optional first stage of meta-training (the MEND / ICAE / HyperTuning recipe): the PGM
compresses the first part of a text and the LM, reading only the prompt, predicts the rest.

The texts are made from the train tasks' own inputs (several inputs of one task, joined), so nothing is downloaded and
no dev or reserved family is seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .task import Task

TEXT_SEPARATOR = "\n\n"
# A continuation cut at a word boundary shorter than this is cut inside the text instead (texts without spaces).
MIN_CONTINUATION_CHARACTERS = 20
# The LM predicts a continuation's tokens after its first, so one of fewer tokens leaves its loss nothing to score.
MIN_CONTINUATION_TOKENS = 2


@dataclass
class TextEpisode:
    """A text cut in two: the PGM reads `prefix`, the LM predicts `continuation` after the prompt."""

    task_name: str
    prefix: str
    continuation: str


class TextSampler:
    """An endless, seeded stream of text episodes over `tasks`; step `n` depends only on (seed, n), like
    `EpisodeSampler`, so its state is a step counter plus the settings."""

    def __init__(
        self, tasks: Sequence[Task], inputs_per_text: int = 8, prefix_fraction: float = 0.7, seed: int = 0
    ) -> None:
        self.tasks = [task for task in tasks if sum(bool(e.input.strip()) for e in task.examples) >= 2]
        if not self.tasks:
            raise ValueError("TextSampler needs at least one task with two non-empty inputs to make texts from.")
        if isinstance(inputs_per_text, bool) or not isinstance(inputs_per_text, int) or inputs_per_text < 2:
            raise ValueError(f"inputs_per_text must be an int >= 2, got {inputs_per_text!r}.")
        if not 0 < prefix_fraction < 1:
            raise ValueError(f"prefix_fraction must be strictly between 0 and 1, got {prefix_fraction!r}.")
        self.inputs_per_text = inputs_per_text
        self.prefix_fraction = prefix_fraction
        self.seed = seed
        self.step = 0

    def episode(self, step: int) -> TextEpisode:
        rng = random.Random(f"text:{self.seed}:{step}")
        task = self.tasks[rng.randrange(len(self.tasks))]
        inputs = [example.input.strip() for example in task.examples if example.input.strip()]
        picked = rng.sample(inputs, min(self.inputs_per_text, len(inputs)))
        text = TEXT_SEPARATOR.join(picked)
        words = text.split(" ")
        cut = min(max(1, round(len(words) * self.prefix_fraction)), len(words) - 1) if len(words) > 1 else 1
        prefix, continuation = " ".join(words[:cut]), " " + " ".join(words[cut:])  # prefix + continuation == text
        if len(continuation) < MIN_CONTINUATION_CHARACTERS:
            # Few spaces (Japanese, Chinese) left one or two "words" to predict, as little as one token: an empty
            # loss. Cut inside the text instead, at the same fraction of its characters.
            cut = min(max(1, round(len(text) * self.prefix_fraction)), len(text) - 1)
            prefix, continuation = text[:cut], text[cut:]
        return TextEpisode(task.name, prefix=prefix, continuation=continuation)

    def __iter__(self) -> TextSampler:
        return self

    def __next__(self) -> TextEpisode:
        episode = self.episode(self.step)
        self.step += 1
        return episode

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "task_names": [task.name for task in self.tasks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"seed": self.seed, "task_names": [task.name for task in self.tasks]}
        if any(state.get(key) != value for key, value in expected.items()):
            raise ValueError("Text sampler state was saved with other settings; resuming would change the texts.")
        self.step = int(state["step"])
