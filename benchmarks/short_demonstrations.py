"""The shortest 4 shots as demonstrations: `metal+demos` keeps the last 4 shots, about 170 context tokens with a
16-position prompt, while the issue's bar allows a third of ICL-16's tokens (about 207). Keeping the 4 shortest
(in their original order; the PGM reads the other 12 and the prompt is refined on them) leaves room for a prompt of 64
positions within that third, and shows what the choice of the 4 costs with 16.

    python benchmarks/short_demonstrations.py [--pgm pgms/smollm2-compressed-ce-answers] [--seeds 0,1]
        [--refine-steps 10] [--refine-lr 5e-2] [--no-control] [--name short_demonstrations]

Runs, on the dev panel:

* `icl`: all 16 shots as demonstrations (the bar);
* `metal+demos+refine`: the method as it is, the last 4 shots kept (the control; `--no-control` leaves it out);
* `shortest 4, metal+demos+refine`: the 4 shortest shots kept, the prompt made from and refined on the other 12.

Each record names its context tokens; `within_third` says whether they are at most a third of the task's ICL-16
tokens. Dev panel only; writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from nearest_demonstrations import scored  # benchmarks/nearest_demonstrations.py: score a context, print its line
from report import write_records_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

from peft_metal.evaluation import load_eval_tasks
from peft_metal.evaluation.methods import ICL, METAL_DEMOS_REFINE, encode, prepare_method
from peft_metal.evaluation.panels import DEV_PANEL
from peft_metal.evaluation.report import merge_seeds
from peft_metal.inference import ModelParts
from peft_metal.pgm import load_pgm
from peft_metal.precision import cast_frozen_weights

NUM_DEMONSTRATIONS = 4
BUDGET_SHARE = 3  # the bar: at least 3x fewer context tokens than ICL-16 (`within_third`)


def shortest(lengths: Sequence[int], count: int) -> list[int]:
    """Indices of the `count` shortest shots (the earlier first among equals), in their original order."""
    return sorted(sorted(range(len(lengths)), key=lambda i: lengths[i])[:count])


def panel_records(model, tokenizer, tasks, seeds: Sequence[int], queries: int, steps: int, lr: float, control: bool):
    parts = ModelParts.from_model(model)
    records = []
    for seed in seeds:
        for task in tasks:
            shots, task_queries = task.split(DEV_PANEL.shots, queries, seed)
            pairs = [example.as_shot() for example in shots]
            lengths = [len(encode(tokenizer, parts.template.format_shots([pair]))) for pair in pairs]
            kept = shortest(lengths, NUM_DEMONSTRATIONS)
            # the PGM reads the others; the kept shots go last, where prepare_method takes its demonstrations
            reordered = [shot for i, shot in enumerate(shots) if i not in kept] + [shots[i] for i in kept]
            with parts.lora_off():
                runs = [prepare_method(ICL, parts, tokenizer, shots)]
                if control:
                    runs.append(prepare_method(METAL_DEMOS_REFINE, parts, tokenizer, shots, NUM_DEMONSTRATIONS,
                                               refine_steps=steps, refine_lr=lr, seed=seed))
                short = prepare_method(METAL_DEMOS_REFINE, parts, tokenizer, reordered, NUM_DEMONSTRATIONS,
                                       refine_steps=steps, refine_lr=lr, seed=seed)
            runs.append(replace(short, name=f"shortest {NUM_DEMONSTRATIONS}, {METAL_DEMOS_REFINE}"))
            records += [scored(parts, tokenizer, task, prepared, task_queries, seed) for prepared in runs]
    records = merge_seeds(records) if len(seeds) > 1 else records
    icl_tokens = {record["task"]: record["context_tokens"] for record in records if record["method"] == ICL}
    return [dict(record, within_third=record["context_tokens"] * BUDGET_SHARE <= icl_tokens[record["task"]])
            for record in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pgm", default="pgms/smollm2-compressed-ce-answers")
    parser.add_argument("--seeds", default=",".join(map(str, DEV_PANEL.seeds)))
    parser.add_argument("--queries", type=int, default=DEV_PANEL.queries)
    parser.add_argument("--refine-steps", type=int, default=10)
    parser.add_argument("--refine-lr", type=float, default=5e-2)
    parser.add_argument("--no-control", action="store_true", help="leave out metal+demos+refine with the last 4")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="short_demonstrations")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]

    model, tokenizer, source = load_pgm(args.model, args.pgm)
    precision = cast_frozen_weights(model, "auto")
    tasks = load_eval_tasks(list(DEV_PANEL.tasks))
    started = time.perf_counter()
    records = panel_records(model, tokenizer, tasks, seeds, args.queries, args.refine_steps, args.refine_lr,
                            not args.no_control)
    caption = (
        f"The dev panel ({len(tasks)} tasks, {DEV_PANEL.shots} shots, {args.queries} queries x seeds {seeds}): "
        f"`metal+demos+refine` ({args.refine_steps} Adam steps at {args.refine_lr:g}, batches of 8) keeping the last "
        f"{NUM_DEMONSTRATIONS} shots, or the {NUM_DEMONSTRATIONS} shortest (`shortest {NUM_DEMONSTRATIONS}`); PGM "
        f"{source}; {precision} weights "
        f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{time.perf_counter() - started:.0f} s). Prompt s: making and refining the prompt."
    )
    write_records_report(args.output, args.name, caption, records, precision=precision)


if __name__ == "__main__":
    main()
