"""Does one PGM serve many shot counts? Dev accuracy over |XP| (shots the PGM reads) and |XL| (shots kept as
demonstrations), with the same seeded queries everywhere.

    python experiments/shot_counts.py --pgm PATH [--model smollm2-135m] [--tasks a,b | default: dev MC tasks]
        [--xp 4,8,16,32] [--xl 0,4] [--queries 30] [--seed 0] [--output benchmarks/results/shot_counts.json]

Writes the JSON (every record) and a markdown table (mean accuracy, rows |XP|, columns |XL|) beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import peft_metal  # noqa: F401
from peft_metal.base_models import load_base_model
from peft_metal.data import load_bigbench_task, tasks_for_split
from peft_metal.evaluation import evaluate
from peft_metal.pgm import attach_pgm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pgm", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--xp", default="4,8,16,32")
    parser.add_argument("--xl", default="0,4")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "shot_counts.json")
    args = parser.parse_args()

    lm, tokenizer = load_base_model(args.model, device="cuda" if torch.cuda.is_available() else None)
    model = attach_pgm(lm, args.pgm).eval()
    names = args.tasks.split(",") if args.tasks else tasks_for_split("dev")
    tasks = [task for task in map(load_bigbench_task, names) if task.metric == "multiple_choice"]
    xps, xls = [int(v) for v in args.xp.split(",")], [int(v) for v in args.xl.split(",")]
    needed = max(xps) + max(xls) + args.queries
    tasks = [task for task in tasks if len(task.examples) >= needed]
    table: dict[tuple[int, int], float] = {}
    records = []
    for xp in xps:
        for xl in xls:
            method = "metal" if xl == 0 else "metal+demos"
            results = evaluate(model, tokenizer, tasks, [method], xp + xl, args.queries, args.seed, num_demonstrations=xl or 4)
            ok = [r for r in results if "error" not in r]
            table[(xp, xl)] = sum(r["score"] for r in ok) / max(len(ok), 1)
            records += [{**r, "xp": xp, "xl": xl} for r in results]
            print(f"|XP|={xp} |XL|={xl}: {table[(xp, xl)]:.3f} over {len(ok)} tasks")
    machine = f"{platform.machine()}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"pgm": args.pgm, "machine": machine, "tasks": [t.name for t in tasks], "results": records}, indent=1))
    lines = [
        f"`python experiments/shot_counts.py --pgm {args.pgm} --queries {args.queries}` on {machine}; "
        f"mean accuracy over {len(tasks)} dev multiple-choice tasks",
        "",
        "| \\|XP\\| | " + " | ".join(f"\\|XL\\|={xl}" for xl in xls) + " |",
        "|---|" + "---|" * len(xls),
    ]
    lines += [f"| {xp} | " + " | ".join(f"{table[(xp, xl)]:.3f}" for xl in xls) + " |" for xp in xps]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
