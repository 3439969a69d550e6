"""Does a PGM's prompt carry its task? `metal` on the dev panel with each task's prompt made from its own shots,
and again from the shots of the next panel task (a fixed rotation), same queries and seeds.

    python benchmarks/prompt_swap.py --pgm pgms/smollm2-compressed-ce-answers [--queries 25] [--name prompt_swap]
    python benchmarks/prompt_swap.py --methods icl --name prompt_swap_icl   # the same question asked of ICL-16
    python benchmarks/prompt_swap.py --pgm PGM --tasks a,b,c   # other tasks than the panel's (train or dev ones)
    python benchmarks/prompt_swap.py --pgm PGM --symbol-labels --tasks a,b,c   # their labels renamed to arbitrary words

If the swapped prompt scores as the own one, the PGM writes one generic prompt whatever the shots say, and its margin
over zero-shot is not the task's. Asked of `icl` (demonstrations from the other task), it says how much of ICL's own
margin is the task's and how much is the format any shots show. With `--symbol-labels` (classification tasks only)
each task's labels are renamed to arbitrary words, one renaming per task (`task_with_symbol_labels`), so only the
shots tell the answers' names and what goes with what: whether the prompt carries them. Writes `<name>.json` and `.md` under
benchmarks/results.
"""

from __future__ import annotations

import argparse
import platform
import random
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from report import write_records_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

import peft_metal  # noqa: F401
from peft_metal.base_models import load_base_model
from peft_metal.data.episodes import task_with_symbol_labels
from peft_metal.evaluation import load_eval_tasks
from peft_metal.evaluation.panels import DEV_PANEL
from peft_metal.evaluation.report import merge_seeds
from peft_metal.evaluation.runner import evaluate_method, task_metric
from peft_metal.inference import ModelParts
from peft_metal.precision import cast_frozen_weights


def panel_records(model, tokenizer, tasks, queries: int, methods: list[str]) -> list[dict[str, Any]]:
    """Each method on every task's queries with its shots from either task, one record per task, method and condition
    (merged over the panel's seeds); the condition is in the record's method, so the project's report functions
    apply."""
    parts = ModelParts.from_model(model)
    records = []
    with parts.lora_off(), torch.no_grad():
        for seed in DEV_PANEL.seeds:
            splits = [task.split(DEV_PANEL.shots, queries, seed) for task in tasks]
            for index, task in enumerate(tasks):
                task_queries = splits[index][1]
                donor = (index + 1) % len(tasks)
                for method in methods:
                    for condition, source in (("own shots", index), ("next task's shots", donor)):
                        shots = splits[source][0]
                        record = evaluate_method(parts, tokenizer, task, method, shots, task_queries, task_metric(task))
                        records.append(
                            dict(record, method=f"{method} ({condition})", seed=seed, shots_from=tasks[source].name)
                        )
                    print(
                        f"seed {seed} {task.name} {method}: own {records[-2]['score']:.2f}, "
                        f"swapped {records[-1]['score']:.2f}",
                        flush=True,
                    )
    return merge_seeds(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pgm", type=Path, help="a saved PGM folder (needed by the metal methods)")
    parser.add_argument("--methods", default="metal", help="comma-separated methods of `peft-metal eval`")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=DEV_PANEL.queries)
    parser.add_argument("--tasks", help="comma-separated train or dev tasks instead of the dev panel's")
    parser.add_argument("--symbol-labels", action="store_true", help="rename each task's labels to arbitrary words")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="prompt_swap")
    args = parser.parse_args()

    methods = args.methods.split(",")
    if args.pgm is None and any(method.startswith("metal") for method in methods):
        parser.error(f"--methods {args.methods} makes prompts with a PGM: give one with --pgm")
    lm, tokenizer = load_base_model(args.model)
    model = PeftModel.from_pretrained(lm, str(args.pgm)) if args.pgm is not None else lm.requires_grad_(False)
    model.eval()
    precision = cast_frozen_weights(model, "auto")
    tasks = load_eval_tasks(args.tasks.split(",") if args.tasks else list(DEV_PANEL.tasks))
    where = "the tasks given" if args.tasks else "the dev panel"
    if args.symbol_labels:  # seeded by the task's name, so every PGM and method meets the same renaming
        tasks = [task_with_symbol_labels(task, random.Random(task.name)) for task in tasks]
        where += ", each task's labels renamed to arbitrary words"
    records = panel_records(model, tokenizer, tasks, args.queries, methods)
    caption = (
        f"{', '.join(f'`{method}`' for method in methods)} on {where} ({len(tasks)} tasks, {args.queries} queries "
        f"x seeds {list(DEV_PANEL.seeds)}), PGM `{args.pgm}`, {precision} frozen weights; the prompt made from (or the "
        f"demonstrations taken from) the task's own shots, or the next panel task's ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})."
    )
    pgm = None if args.pgm is None else str(args.pgm)
    write_records_report(args.output, args.name, caption, records, pgm=pgm, precision=precision)


if __name__ == "__main__":
    main()
