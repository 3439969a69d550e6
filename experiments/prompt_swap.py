"""Does a PGM's prompt carry its task? `metal` on the dev panel with each task's prompt made from its own shots,
and again from the shots of the next panel task (a fixed rotation), same queries and seeds; optionally with one fixed
prompt for every task, the mean of the PGM's prompts over train tasks.

    python experiments/prompt_swap.py --pgm pgms/smollm2-compressed-ce-answers [--queries 25] [--name prompt_swap]
    python experiments/prompt_swap.py --methods icl --name prompt_swap_icl   # the same question asked of ICL-16
    python experiments/prompt_swap.py --pgm PGM --tasks a,b,c   # other tasks than the panel's (train or dev ones)
    python experiments/prompt_swap.py --pgm PGM --symbol-labels --tasks a,b,c   # their labels renamed to arbitrary words
    python experiments/prompt_swap.py --pgm PGM --conditions own,mean   # against one prompt for every task

If the swapped prompt scores as the own one, the PGM writes one generic prompt whatever the shots say, and its margin
over zero-shot is not the task's. Asked of `icl` (demonstrations from the other task), it says how much of ICL's own
margin is the task's and how much is the format any shots show. With `--symbol-labels` (classification tasks only)
each task's labels are renamed to arbitrary words, one renaming per task (`task_with_symbol_labels`), so only the
shots tell the answers' names and what goes with what: whether the prompt carries them. The `mean` condition scores
every task with the same prompt: the mean of the PGM's one-pass prompts (its payload tensors, averaged) over the
first train task of every train family (16 shots each, drawn by a seed of the task's name); what the own prompt gains
over it is all that its shots put into it. Writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import argparse
import platform
import random
from pathlib import Path
from typing import Any

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from report import write_records_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves
from task_carrying import mean_prompt

import peft_metal  # noqa: F401
from peft_metal.base_models import load_base_model
from peft_metal.data import load_bigbench_task, task_family, tasks_for_split
from peft_metal.data.episodes import task_with_symbol_labels
from peft_metal.evaluation import load_eval_tasks
from peft_metal.evaluation.methods import METAL, PreparedMethod
from peft_metal.evaluation.panels import BIGBENCH_PANEL as DEV_PANEL  # BIG-bench probes
from peft_metal.evaluation.report import merge_seeds
from peft_metal.evaluation.runner import evaluate_method, evaluate_prepared, task_metric
from peft_metal.inference import ModelParts, prompt_context
from peft_metal.metal_prompt.prompt import GeneratedPrompt
from peft_metal.pgm import attach_pgm
from peft_metal.precision import cast_frozen_weights

LABELS = {"own": "own shots", "swapped": "next task's shots", "mean": "train tasks' mean prompt"}
CONDITIONS = tuple(LABELS)


def first_task_of_each_family(names: list[str]) -> list[str]:
    """One train task per family (the first by name), so no family with many subtasks weighs more in the mean."""
    chosen: dict[str, str] = {}
    for name in sorted(names):
        chosen.setdefault(task_family(name), name)
    return list(chosen.values())


def panel_records(
    model,
    tokenizer,
    tasks,
    queries: int,
    methods: list[str],
    conditions: list[str],
    fixed: GeneratedPrompt | None = None,
    seeds: tuple[int, ...] = DEV_PANEL.seeds,
) -> list[dict[str, Any]]:
    """Each method on every task's queries under each condition (its own shots, the next task's, or, for `metal`, the
    fixed prompt `fixed`), one record per task, method and condition (merged over `seeds`); the condition is
    in the record's method, so the project's report functions apply."""
    parts = ModelParts.from_model(model)
    records = []
    with parts.lora_off(), torch.no_grad():
        for seed in seeds:
            splits = [task.split(DEV_PANEL.shots, queries, seed) for task in tasks]
            for index, task in enumerate(tasks):
                task_queries = splits[index][1]
                donor = (index + 1) % len(tasks)
                for method in methods:
                    scores = []
                    for condition in conditions:
                        label = f"{method} ({LABELS[condition]})"
                        if condition == "mean":
                            prepared = PreparedMethod(
                                label, prompt_context(parts.lm, fixed), 0.0, fixed.context_length, prompt=fixed
                            )
                            record = evaluate_prepared(
                                parts, tokenizer, task, prepared, task_queries, task_metric(task)
                            )
                            shots_from = "train tasks"
                        else:
                            source = index if condition == "own" else donor
                            record = evaluate_method(
                                parts, tokenizer, task, method, splits[source][0], task_queries, task_metric(task)
                            )
                            shots_from = tasks[source].name
                        records.append(dict(record, method=label, seed=seed, shots_from=shots_from))
                        scores.append(f"{condition} {record['score']:.2f}")
                    print(f"seed {seed} {task.name} {method}: {', '.join(scores)}", flush=True)
    return merge_seeds(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pgm", type=Path, help="a saved PGM folder (needed by the metal methods)")
    parser.add_argument("--methods", default="metal", help="comma-separated methods of `peft-metal eval`")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=DEV_PANEL.queries)
    parser.add_argument("--tasks", help="comma-separated train or dev tasks instead of the dev panel's")
    parser.add_argument("--symbol-labels", action="store_true", help="rename each task's labels to arbitrary words")
    parser.add_argument(
        "--seeds",
        default=",".join(map(str, DEV_PANEL.seeds)),
        help="the draws of shots and queries (another draw of the panel: 2,3)",
    )
    parser.add_argument(
        "--conditions",
        default="own,swapped",
        help=f"comma-separated, of {', '.join(CONDITIONS)} (mean: one prompt for every task, `metal` only)",
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="prompt_swap")
    args = parser.parse_args()

    methods = args.methods.split(",")
    if args.pgm is None and any(method.startswith("metal") for method in methods):
        parser.error(f"--methods {args.methods} makes prompts with a PGM: give one with --pgm")
    conditions = args.conditions.split(",")
    if unknown := [condition for condition in conditions if condition not in CONDITIONS]:
        parser.error(f"unknown --conditions {unknown}: choose from {', '.join(CONDITIONS)}")
    if "mean" in conditions and methods != [METAL]:
        parser.error(f"--conditions mean scores one fixed `metal` prompt; use --methods {METAL}, not {args.methods}")
    lm, tokenizer = load_base_model(args.model)
    model = attach_pgm(lm, str(args.pgm)) if args.pgm is not None else lm.requires_grad_(False)
    model.eval()
    precision = cast_frozen_weights(model, "auto")
    tasks = load_eval_tasks(args.tasks.split(",") if args.tasks else list(DEV_PANEL.tasks))
    where = "the tasks given" if args.tasks else "the dev panel"
    if args.symbol_labels:  # seeded by the task's name, so every PGM and method meets the same renaming
        tasks = [task_with_symbol_labels(task, random.Random(task.name)) for task in tasks]
        where += ", each task's labels renamed to arbitrary words"
    fixed = None
    if "mean" in conditions:
        family_tasks = [load_bigbench_task(name) for name in first_task_of_each_family(tasks_for_split("train"))]
        with torch.no_grad():
            fixed = mean_prompt(model.base_model, tokenizer, family_tasks, DEV_PANEL.shots)
    seeds = tuple(int(seed) for seed in args.seeds.split(","))
    records = panel_records(model, tokenizer, tasks, args.queries, methods, conditions, fixed, seeds)
    caption = (
        f"{', '.join(f'`{method}`' for method in methods)} on {where} ({len(tasks)} tasks, {args.queries} queries "
        f"x seeds {list(seeds)}), PGM `{args.pgm}`, {precision} frozen weights; the prompt made from (or the "
        f"demonstrations taken from) the task's own shots, or the next panel task's, or one prompt for every task (the "
        f"mean of the PGM's prompts over the first train task of each train family) ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})."
    )
    pgm = None if args.pgm is None else str(args.pgm)
    write_records_report(args.output, args.name, caption, records, pgm=pgm, precision=precision)


if __name__ == "__main__":
    main()
