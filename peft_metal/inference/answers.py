"""Turning what the LM produced into an answer: where a generated answer ends, and which option wins."""

from __future__ import annotations

from typing import Sequence

from ..metal_prompt.template import ShotTemplate


def cut_generation(text: str, template: ShotTemplate) -> str:
    """The answer part of generated text: up to the template's shot separator or the first newline, stripped.

    The answer itself follows the query after the template's answer separator (a space), which is dropped first.
    """
    text = text.lstrip(" ")
    stops = [stop for stop in (template.shot_separator, "\n") if stop]
    end = min((text.find(stop) for stop in stops if stop in text), default=len(text))
    return text[:end].strip()


def has_stop(text: str, template: ShotTemplate) -> bool:
    """Whether generated text already holds a full answer (a stop string after the leading space)."""
    text = text.lstrip(" ")
    return any(stop and stop in text for stop in (template.shot_separator, "\n"))


def best_option(scores: Sequence[float]) -> int:
    """Index of the highest score (the first one on ties)."""
    return max(range(len(scores)), key=lambda index: (scores[index], -index))
