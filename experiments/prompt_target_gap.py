"""How close must the one pass come to a prompt target to gain what the target gains? On train tasks with targets.

    python experiments/prompt_target_gap.py --targets runs/prompt-targets-84 --tasks a,b,c \
        --pgm pgms/smollm2-compressed-ce-answers [--pgm runs/RUN/checkpoint-N/pgm ...] [--alphas 0.5,0.75] \
        [--queries 50] [--name prompt_target_gap]

For each task: its target's own 16 shots (the fixed draw `peft-metal prompt-targets` refined on) and `--queries` other
examples as queries. Scored as `metal` is: each `--pgm`'s one-pass prompt from those shots; the first PGM's from
another draw of 16 shots (meta-training's episodes draw theirs at random); the target itself; and
prompts on the line from the first PGM's one pass to the target (one pass + alpha x (target - one pass)). Every prompt
carries its distance to the target as meta-training measures it (`prompt_target_loss`). If the target scores well
above the one pass and halfway scores as the target, the one pass has to close only part of the distance; if a
trained PGM's distance falls but its accuracy does not rise, the distance is not measuring what the queries need.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from report import provenance, write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

import peft_metal  # noqa: F401
from peft_metal.base_models import load_base_model
from peft_metal.designs import get_design
from peft_metal.evaluation import load_eval_tasks
from peft_metal.evaluation.methods import PreparedMethod
from peft_metal.evaluation.report import markdown_table, summary
from peft_metal.evaluation.runner import evaluate_prepared, task_metric
from peft_metal.inference import ModelParts, prompt_context
from peft_metal.metal_prompt.prompt import GeneratedPrompt
from peft_metal.pgm import attach_pgm
from peft_metal.precision import cast_frozen_weights
from peft_metal.training.prompt_targets import MANIFEST, load_prompt_targets, prompt_target_loss, target_path


def draws_of(task, shots: int, queries: int, seed: int):
    """The target's shots (drawn exactly as `make_prompt_targets` drew them), other examples as queries, and another
    draw of as many shots from the examples that are not queries (it may share some of the target's shots)."""
    target_shots, _ = task.split(shots, 0, seed)
    rest = [example for example in task.examples if example not in target_shots]
    if len(rest) < queries:
        raise SystemExit(f"{task.name} has {len(rest)} examples besides its target's shots; ask for fewer --queries.")
    task_queries = random.Random(seed + 1).sample(rest, queries)
    not_queries = [example for example in task.examples if example not in task_queries]
    return target_shots, task_queries, random.Random(seed + 2).sample(not_queries, shots)


def interpolate(start: GeneratedPrompt, end: GeneratedPrompt, alpha: float, lm) -> GeneratedPrompt:
    design = get_design(start.design)
    a, b = design.tunable_payload(start, lm), design.tunable_payload(end, lm)
    return replace(
        start,
        **{name: (a[name].float() + alpha * (b[name].float() - a[name].float())).to(a[name].dtype) for name in a},
    )


def score(parts, tokenizer, task, name: str, prompt: GeneratedPrompt, target, queries) -> dict[str, Any]:
    prepared = PreparedMethod(name, prompt_context(parts.lm, prompt), 0.0, prompt.context_length)
    record = evaluate_prepared(parts, tokenizer, task, prepared, queries, task_metric(task))
    record["distance"] = prompt_target_loss(prompt, target, parts.lm).item()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=Path, required=True, help="a `peft-metal prompt-targets` folder")
    parser.add_argument("--tasks", required=True, help="comma-separated train tasks with targets in --targets")
    parser.add_argument("--pgm", type=Path, action="append", required=True, help="a saved PGM (repeatable)")
    parser.add_argument("--alphas", default="0.5,0.75", help="points between the first PGM's one pass and the target")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="prompt_target_gap")
    args = parser.parse_args()

    settings = json.loads((args.targets / MANIFEST).read_text())
    alphas = [float(alpha) for alpha in args.alphas.split(",") if alpha]
    tasks = load_eval_tasks(args.tasks.split(","))
    draws = {task.name: draws_of(task, settings["shots"], args.queries, settings["seed"]) for task in tasks}
    one_passes: dict[str, list[GeneratedPrompt]] = {task.name: [] for task in tasks}
    other_draws: dict[str, GeneratedPrompt] = {}
    for pgm in args.pgm:  # one PGM loaded at a time, its one-pass prompts kept
        lm, tokenizer = load_base_model(args.model)
        model = attach_pgm(lm, str(pgm)).eval()
        precision = cast_frozen_weights(model, "auto")
        with torch.no_grad():
            for task in tasks:
                pairs = [example.as_shot() for example in draws[task.name][0]]
                one_passes[task.name].append(
                    model.base_model.generate_prompt(pairs, tokenizer=tokenizer, chunk_size="auto")
                )
                if pgm == args.pgm[0]:  # how far the target is from the same PGM's prompt for other shots of the task
                    other = [example.as_shot() for example in draws[task.name][2]]
                    other_draws[task.name] = model.base_model.generate_prompt(
                        other, tokenizer=tokenizer, chunk_size="auto"
                    )
    parts = ModelParts.from_model(model)
    # the tensors meta-training reads them as, checked against the PGM (design, K, base model)
    targets = load_prompt_targets(args.targets, [task.name for task in tasks], model.base_model)
    records = []
    with parts.lora_off(), torch.no_grad():
        for task in tasks:
            target_prompt = GeneratedPrompt.load(target_path(args.targets, task.name))
            target = targets[task.name]
            first = one_passes[task.name][0]
            prompts = [(f"one pass: {pgm}", prompt) for pgm, prompt in zip(args.pgm, one_passes[task.name])]
            prompts.append((f"one pass from another draw of shots: {args.pgm[0]}", other_draws[task.name]))
            prompts += [
                (f"alpha {alpha} towards the target", interpolate(first, target_prompt, alpha, lm)) for alpha in alphas
            ]
            prompts.append(("target (refined)", target_prompt))
            for name, prompt in prompts:
                records.append(score(parts, tokenizer, task, name, prompt, target, draws[task.name][1]))
                print(
                    f"{task.name} {name}: {records[-1]['score']:.2f} (distance {records[-1]['distance']:.4f})",
                    flush=True,
                )
    methods = list(dict.fromkeys(record["method"] for record in records))
    distances = [
        f"| {method} | {sum(r['distance'] for r in records if r['method'] == method) / len(tasks):.4f} |"
        for method in methods
    ]
    caption = (
        f"Train tasks with prompt targets (`{args.targets}`: {settings}), each scored on {args.queries} examples "
        f"besides its target's shots; {precision} frozen weights."
    )
    report = {**provenance(), "targets": str(args.targets), "settings": settings, "summary": summary(records)}
    report["records"] = records
    table = ["| prompt | mean distance to the target |", "|---|---|", *distances]
    lines = [caption, "", markdown_table(records), "", *table]
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
