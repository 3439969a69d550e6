"""Does bf16 change what evaluation measures? The dev panel scored with fp32 and with bf16 frozen weights.

    python benchmarks/precision_eval.py [--pgm peft_metal/shipped/smollm2-135m] [--methods zero_shot,icl,metal]
        [--queries 25] [--output benchmarks/results]

Same PGM, same seeded shots and queries (the dev panel's tasks and seeds); writes `precision_eval.json` and `.md` with
each method's mean accuracy under both precisions, the difference (target: within 1 point) and the time each took.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from report import (  # benchmarks/report.py: the JSON + markdown every benchmark leaves
    machine_description,
    write_report,
)

import peft_metal  # noqa: F401
from peft_metal.evaluation import EvaluationSettings, evaluate_seeds, load_eval_tasks
from peft_metal.evaluation.panels import BIGBENCH_PANEL as DEV_PANEL  # BIG-bench probes
from peft_metal.evaluation.report import summary
from peft_metal.pgm import load_pgm
from peft_metal.precision import cast_frozen_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pgm", default=None, help="default: the shipped PGM")
    parser.add_argument("--methods", default="zero_shot,icl,metal")
    parser.add_argument("--queries", type=int, default=DEV_PANEL.queries)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    tasks = load_eval_tasks(names=list(DEV_PANEL.tasks))
    runs = {}
    for precision in ("fp32", "bf16"):
        model, tokenizer, pgm = load_pgm(args.model, args.pgm, None, 0)
        assert cast_frozen_weights(model, precision) == precision
        started = time.perf_counter()
        records = evaluate_seeds(model, tokenizer, tasks, EvaluationSettings(args.methods, DEV_PANEL.shots, args.queries), DEV_PANEL.seeds)
        runs[precision] = {"seconds": round(time.perf_counter() - started, 1), "summary": summary(records), "records": records}

    machine = machine_description()
    report = {"command": "python benchmarks/precision_eval.py " + " ".join(sys.argv[1:]), "machine": machine,
              "pgm": pgm, "panel": DEV_PANEL.name, "queries": args.queries, "runs": runs}
    lines = [
        f"Dev panel ({len(tasks)} tasks x {args.queries} queries x seeds {list(DEV_PANEL.seeds)}), PGM {pgm}; "
        f"{machine}.",
        "",
        "| method | fp32 accuracy | bf16 accuracy | bf16 - fp32 |",
        "|---|---|---|---|",
    ]
    for method, fp32 in runs["fp32"]["summary"].items():
        bf16 = runs["bf16"]["summary"][method]
        lines.append(
            f"| {method} | {fp32['mean']:.3f} ± {fp32['se']:.3f} | {bf16['mean']:.3f} ± {bf16['se']:.3f} | "
            f"{bf16['mean'] - fp32['mean']:+.3f} |"
        )
    lines += ["", f"Wall time: fp32 {runs['fp32']['seconds']} s, bf16 {runs['bf16']['seconds']} s."]
    write_report(args.output, "precision_eval", report, lines)


if __name__ == "__main__":
    main()
