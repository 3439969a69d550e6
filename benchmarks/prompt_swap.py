"""Does a PGM's prompt carry its task? `metal` on the dev panel with each task's prompt made from its own shots,
and again from the shots of the next panel task (a fixed rotation), same queries and seeds.

    python benchmarks/prompt_swap.py --pgm pgms/smollm2-compressed-ce-answers [--queries 25] [--name prompt_swap]

If the swapped prompt scores as the own one, the PGM writes one generic prompt whatever the shots say, and its margin
over zero-shot is not the task's. Writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from report import write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

import peft_metal  # noqa: F401
from peft_metal.base_models import load_base_model
from peft_metal.evaluation import load_eval_tasks
from peft_metal.evaluation.panels import DEV_PANEL
from peft_metal.evaluation.report import markdown_table, merge_seeds, summary
from peft_metal.evaluation.runner import evaluate_method, task_metric
from peft_metal.inference import ModelParts
from peft_metal.precision import cast_frozen_weights

OWN, SWAPPED = "metal (own shots)", "metal (next task's shots)"


def panel_records(model, tokenizer, tasks, queries: int) -> list[dict[str, Any]]:
    """`metal` on every task's queries with the prompt from either shot set, one record per task and condition
    (merged over the panel's seeds); the condition is the record's method, so the project's report functions apply."""
    parts = ModelParts.from_model(model)
    records = []
    with parts.lora_off(), torch.no_grad():
        for seed in DEV_PANEL.seeds:
            splits = [task.split(DEV_PANEL.shots, queries, seed) for task in tasks]
            for index, task in enumerate(tasks):
                task_queries = splits[index][1]
                donor = (index + 1) % len(tasks)
                for condition, source in ((OWN, index), (SWAPPED, donor)):
                    shots = splits[source][0]
                    record = evaluate_method(parts, tokenizer, task, "metal", shots, task_queries, task_metric(task))
                    records.append(dict(record, method=condition, seed=seed, shots_from=tasks[source].name))
                print(
                    f"seed {seed} {task.name}: own {records[-2]['score']:.2f}, swapped {records[-1]['score']:.2f}",
                    flush=True,
                )
    return merge_seeds(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pgm", type=Path, required=True, help="a saved PGM folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=DEV_PANEL.queries)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="prompt_swap")
    args = parser.parse_args()

    lm, tokenizer = load_base_model(args.model)
    model = PeftModel.from_pretrained(lm, str(args.pgm))
    model.eval()
    precision = cast_frozen_weights(model, "auto")
    tasks = load_eval_tasks(list(DEV_PANEL.tasks))
    records = panel_records(model, tokenizer, tasks, args.queries)
    lines = [
        f"`metal` on the dev panel ({len(tasks)} tasks, {args.queries} queries x seeds {list(DEV_PANEL.seeds)}), PGM "
        f"`{args.pgm}`, {precision} frozen weights; the prompt made from the task's own shots, or from the next panel "
        f"task's ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}).",
        "",
        markdown_table(records),
    ]
    report = {
        "command": "python benchmarks/prompt_swap.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "pgm": str(args.pgm),
        "precision": precision,
        "summary": summary(records),
        "records": records,
    }
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
