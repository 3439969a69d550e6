"""Named task panels: fixed sets of tasks, queries and seeds that evaluation reports are compared on.

`dev-panel` is what choices are made on (designs, scopes, objectives, checkpoints): every dev family that has
multiple-choice tasks, at most two tasks from each, 25 queries per task and seed, seeds 0 and 1, so 700 questions
(one standard error of a mean accuracy near 0.5 is about 0.019, against 0.037 for the 180 questions of the six dev
tasks used before). Only dev families are in it: nothing here is reserved for acceptance testing.

`dev-panel-confirm` is the same tasks drawn again (seeds 2 and 3: other shots and queries; a small task shares some
questions between draws), to confirm a choice made on `dev-panel`. A PGM's prompt depends on the 16 shots it reads,
and two draws per task are few: a PGM chosen as the best of many on one draw carries that draw's luck, which a
second draw does not share (docs/results.md, "A second draw"). A winner on `dev-panel` is a candidate until it wins
here too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..data import check_allowed


@dataclass(frozen=True)
class Panel:
    name: str
    tasks: tuple[str, ...]
    shots: int
    queries: int
    seeds: tuple[int, ...]

    @property
    def questions(self) -> int:
        return len(self.tasks) * self.queries * len(self.seeds)


DEV_PANEL = Panel(
    name="dev-panel",
    tasks=(
        "bbq_lite_json/age_ambig",
        "bbq_lite_json/age_disambig",
        "cause_and_effect/one_sentence",
        "cause_and_effect/two_sentences",
        "code_line_description",
        "mathematical_induction",
        "phrase_relatedness",
        "reasoning_about_colored_objects",
        "similarities_abstraction",
        "snarks",
        "swahili_english_proverbs",
        "swedish_to_german_proverbs",
        "unit_conversion/si_conversion",
        "unit_conversion/unit_identification",
    ),
    shots=16,
    queries=25,
    seeds=(0, 1),
)

DEV_PANEL_CONFIRM = replace(DEV_PANEL, name="dev-panel-confirm", seeds=(2, 3))

PANELS = {panel.name: panel for panel in (DEV_PANEL, DEV_PANEL_CONFIRM)}


def get_panel(name: str) -> Panel:
    if name not in PANELS:
        raise ValueError(f"Unknown panel {name!r}; choose one of {list(PANELS)}.")
    panel = PANELS[name]
    for task in panel.tasks:
        check_allowed(task, "dev")
    return panel
