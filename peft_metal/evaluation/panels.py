"""Named task panels: fixed sets of tasks, queries and seeds that evaluation reports are compared on.

`dev-panel` is what choices are made on (designs, scopes, objectives, checkpoints): MetaICL's protocol on the ten
MetaICL dev tasks (class -> class training tasks held out from meta-training), each seed's 16 given demonstrations as
the shots and a fixed draw of 100 test queries per seed (all 86 of ethos-gender), MetaICL's five seeds: 4,930
questions, reported as accuracy and macro-F1 with standard errors.

`dev-panel-tasks` checks that a gain is not MetaICL-specific: every task of the BIG-bench-format dev folder
(BIG-Bench-Hard, BBQ, FewRel, intent families held out from meta-training), 25 queries per seed, seeds 0 and 1.

`bigbench-panel` and `bigbench-panel-confirm` are the panels of BIG-bench itself that choices were made on until
BIG-bench's files were withdrawn (docs/research-log.md); they need a clone's task folders.

A panel's tasks come from a folder given on the command line or from `$PEFT_METAL_DATA` (`data.corpora`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..data import check_allowed
from ..data.metaicl import SEEDS as METAICL_SEEDS

# Where a panel's tasks are read from.
METAICL, TASKS, BIGBENCH = "metaicl", "tasks", "bigbench"


@dataclass(frozen=True)
class Panel:
    name: str
    source: str
    tasks: tuple[str, ...]
    shots: int
    queries: int
    seeds: tuple[int, ...]

    @property
    def questions(self) -> int:
        """Questions asked, if every task has `queries` queries per seed (a MetaICL task with fewer test queries
        gives all it has)."""
        return len(self.tasks) * self.queries * len(self.seeds)


DEV_PANEL = Panel(
    name="dev-panel",
    source=METAICL,
    tasks=(
        "emotion", "ethos-gender", "glue-mrpc", "hatexplain", "rotten_tomatoes", "sick", "sms_spam", "superglue-wic",
        "trec", "tweet_eval-irony",
    ),
    shots=16,
    queries=100,
    seeds=METAICL_SEEDS,
)

DEV_PANEL_TASKS = Panel(
    name="dev-panel-tasks",
    source=TASKS,
    tasks=(
        "bbh_object_counting", "bbh_reasoning_about_colored_objects", "bbh_snarks",
        "bbq/age", "bbq/disability_status", "bbq/nationality", "bbq/physical_appearance", "bbq/religion",
        "bbq/sexual_orientation",
        "fewrel_semeval/group_01", "fewrel_semeval/group_02", "fewrel_semeval/group_03",
        "nlu_evaluation_intent/group_01", "nlu_evaluation_intent/group_02", "nlu_evaluation_intent/group_03",
        "nlu_evaluation_intent/group_04",
    ),
    shots=16,
    queries=25,
    seeds=(0, 1),
)

BIGBENCH_PANEL = Panel(
    name="bigbench-panel",
    source=BIGBENCH,
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

BIGBENCH_PANEL_CONFIRM = replace(BIGBENCH_PANEL, name="bigbench-panel-confirm", seeds=(2, 3))

PANELS = {panel.name: panel for panel in (DEV_PANEL, DEV_PANEL_TASKS, BIGBENCH_PANEL, BIGBENCH_PANEL_CONFIRM)}


def get_panel(name: str) -> Panel:
    if name not in PANELS:
        raise ValueError(f"Unknown panel {name!r}; choose one of {list(PANELS)}.")
    panel = PANELS[name]
    if panel.source == BIGBENCH:
        for task in panel.tasks:
            check_allowed(task, "dev")
    return panel
