"""Does the prompt carry the task? `metal` on the MetaICL dev panel with each task's prompt made from (a) its own
shots, (b) one fixed prompt for every task (the mean of the PGM's prompts over MetaICL's class -> class train tasks),
and (c) another dev task's shots relabelled onto this task's options; same seeds and queries.

    PEFT_METAL_DATA=../shared python benchmarks/task_carrying.py --pgm PGM [--queries 100] [--name task_carrying]

(b) carries nothing of the task's shots, so what (a) gains over it is what the shots put into the prompt. (c) keeps the
task's label names but shows another task's inputs and their pairing with those labels: what (a) gains over it is what
the prompt carries beyond the label set. Issue 43's target: (a) at least 5 points of macro-F1 above (b) and (c).
Writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path
from typing import Any, Sequence

import torch
from report import machine_description, write_records_report

import peft_metal  # noqa: F401
from peft_metal.data import Example, Task, load_metaicl_pool, load_metaicl_splits
from peft_metal.data.corpora import corpus_dir
from peft_metal.designs import DESIGNS
from peft_metal.evaluation.methods import METAL, PreparedMethod
from peft_metal.evaluation.panels import DEV_PANEL
from peft_metal.evaluation.report import merge_seeds
from peft_metal.evaluation.runner import evaluate_method, evaluate_prepared, task_metric
from peft_metal.evaluation.tasks import load_panel_tasks
from peft_metal.inference import ModelParts, prompt_context
from peft_metal.metal_prompt.prompt import GeneratedPrompt
from peft_metal.pgm import load_pgm
from peft_metal.precision import cast_frozen_weights

CONDITIONS = {"own": "own shots", "mean": "fixed mean prompt", "relabelled": "other task's shots, relabelled"}


def mean_prompt(tuner: Any, tokenizer: Any, tasks: Sequence[Task], shots: int) -> GeneratedPrompt:
    """The mean of the PGM's one-pass prompts over `tasks` (each from `shots` examples drawn by a seed of its name):
    one prompt for every task, which carries nothing of any one task's shots."""
    design = DESIGNS[tuner.metal_config.prompt_design]
    if "token_ids" in design.payload:
        raise SystemExit(f"A mean prompt averages a prompt's tensors; a {tuner.metal_config.prompt_design} prompt is tokens.")
    prompts = []
    for task in tasks:
        drawn = random.Random(f"mean prompt:{task.name}").sample(task.examples, shots)
        prompts.append(tuner.generate_prompt([e.as_shot() for e in drawn], tokenizer=tokenizer, chunk_size="auto"))
    means = {
        name: torch.stack([getattr(p, name).float() for p in prompts]).mean(0).to(getattr(prompts[0], name).dtype)
        for name in design.payload
    }
    return dataclasses.replace(prompts[0], **means)


def relabelled(shots: Sequence[Example], options: Sequence[str]) -> list[Example]:
    """`shots` of another task with its labels mapped onto `options`: its i-th label (sorted) becomes option
    i mod len(options), so the shots name this task's labels but pair them with another task's inputs."""
    labels = sorted({shot.output for shot in shots} | set(shots[0].options or ()))
    mapping = {label: options[index % len(options)] for index, label in enumerate(labels)}
    return [Example(shot.input, mapping[shot.output], options=tuple(options)) for shot in shots]


def carrying_records(model, tokenizer, tasks, queries: int, seeds, fixed: GeneratedPrompt) -> list[dict[str, Any]]:
    """`metal` on every task's queries under each condition, one record per task and condition, merged over seeds."""
    parts = ModelParts.from_model(model)
    records = []
    with parts.lora_off(), torch.no_grad():
        for seed in seeds:
            draws = [task.split(DEV_PANEL.shots, queries, seed) for task in tasks]
            for index, task in enumerate(tasks):
                shots, task_queries = draws[index]
                donor = tasks[(index + 1) % len(tasks)]
                metric = task_metric(task)
                own = evaluate_method(parts, tokenizer, task, METAL, shots, task_queries, metric)
                prepared = PreparedMethod(METAL, prompt_context(parts.lm, fixed), 0.0, fixed.context_length, prompt=fixed)
                mean = evaluate_prepared(parts, tokenizer, task, prepared, task_queries, metric)
                foreign = relabelled(draws[(index + 1) % len(tasks)][0], task_queries[0].options)
                swapped = evaluate_method(parts, tokenizer, task, METAL, foreign, task_queries, metric)
                for condition, record in zip(CONDITIONS, (own, mean, swapped)):
                    shots_from = donor.name if condition == "relabelled" else task.name
                    records.append(dict(record, method=f"metal ({CONDITIONS[condition]})", seed=seed, shots_from=shots_from))
                print(f"seed {seed} {task.name}: own {own['macro_f1']:.3f}, mean {mean['macro_f1']:.3f}, "
                      f"relabelled {swapped['macro_f1']:.3f} (macro-F1)", flush=True)
    return merge_seeds(records)


def gaps(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean macro-F1 of the own-shots prompt minus each other condition's, over tasks."""
    def mean_f1(condition: str) -> float:
        values = [r["macro_f1"] for r in records if r["method"] == f"metal ({CONDITIONS[condition]})"]
        return sum(values) / len(values)

    return {f"own - {condition}": mean_f1("own") - mean_f1(condition) for condition in ("mean", "relabelled")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pgm", required=True, help="a saved PGM folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metaicl", type=Path, help="MetaICL's data folder (default: $PEFT_METAL_DATA/metaicl)")
    parser.add_argument("--queries", type=int, default=DEV_PANEL.queries)
    parser.add_argument("--seeds", default=",".join(map(str, DEV_PANEL.seeds)))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="task_carrying")
    args = parser.parse_args()

    root = args.metaicl or corpus_dir("metaicl")
    seeds = tuple(int(seed) for seed in args.seeds.split(","))
    panel = dataclasses.replace(DEV_PANEL, seeds=seeds)
    model, tokenizer, pgm = load_pgm(args.model, args.pgm, None, 0)
    model.eval()
    precision = cast_frozen_weights(model, "auto")
    tasks = load_panel_tasks(panel, root)
    train = [load_metaicl_pool(root, name) for name in load_metaicl_splits(root)["class_to_class_train"]]
    train = [task for task in train if len(task.examples) >= DEV_PANEL.shots]
    with torch.no_grad():
        fixed = mean_prompt(model.base_model, tokenizer, train, DEV_PANEL.shots)
    records = carrying_records(model, tokenizer, tasks, args.queries, seeds, fixed)
    measured = gaps(records)
    caption = (
        f"`metal` on the MetaICL dev panel ({len(tasks)} tasks, at most {args.queries} queries x seeds {list(seeds)}), "
        f"PGM `{pgm}`, {precision} frozen weights: the prompt made from the task's own 16 shots, one fixed prompt "
        f"(the mean of the PGM's prompts over {len(train)} class -> class train tasks), or the next panel task's "
        f"shots with their labels mapped onto this task's options. Macro-F1 gaps: "
        + ", ".join(f"{name} {value:+.3f}" for name, value in measured.items())
        + f" ({machine_description()})."
    )
    write_records_report(args.output, args.name, caption, records, pgm=pgm, precision=precision, gaps=measured)


if __name__ == "__main__":
    main()
