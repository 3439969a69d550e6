"""One method against others on the same tasks, paired by task: is a difference of means larger than its noise?

    python experiments/paired_difference.py \
        benchmarks/results/dev_panel_refine_lr1e-2.json=metal+refine@20 \
        benchmarks/results/precision_eval.json:runs.bf16=icl benchmarks/results/dev_panel_p_tuning.json=p_tuning \
        [--name paired_difference]

Each argument is `FILE[:KEY.PATH]=LABEL[#SEEDS][:METRIC]`: an evaluation results file (`peft-metal eval --output`, or a benchmark's
JSON, where `KEY.PATH` leads to the object holding its records, a list's items by index: `points.3`) and a method's column label (`metal+refine@20`), optionally with the seeds whose draws to keep (`icl#21`; `--metric
macro_f1` keeps MetaICL's per seed) and a metric of its own instead of `--metric` (`metal:macro_f1_calibrated`, to
compare one method calibrated from the shots with another as scored). The
first is compared with each of the others. Two runs of the panel with the same seeds score the same questions, so the
per-task differences carry the shared draw once: their mean and its standard error across tasks (sd / sqrt(tasks))
say more than two means, each ± its own error, side by side. Writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
from report import provenance, write_report  # benchmarks/report.py

from peft_metal.evaluation.report import method_label


def task_score(record: dict[str, Any], metric: str, seeds: list[int] | None, run_seeds: Any = None) -> float:
    """A record's `metric` (`score`, or `macro_f1`: MetaICL's); with `seeds`, its mean over those seeds' draws only
    (macro-F1 is kept per seed), so a run of five seeds pairs with one of two. A run of one seed keeps no per-seed
    scores: its record is that seed's."""
    if seeds is None or (record.get("seeds") is None and list(run_seeds or []) == seeds):
        return record[metric]
    by_seed = dict(zip(record["seeds"], record[f"{metric}_seed_scores"]))
    missing = [seed for seed in seeds if seed not in by_seed]
    if missing:
        raise SystemExit(f"{record['task']} / {method_label(record)} has no draw of seed(s) {missing}; it has {list(by_seed)}.")
    return statistics.mean(by_seed[seed] for seed in seeds)


def records_of(
    argument: str, metric: str = "score", seeds: list[int] | None = None
) -> tuple[str, dict[str, float], dict[str, Any]]:
    """The label, its score per task, and the run's settings (tasks, seeds, queries) from `FILE[:KEY.PATH]=LABEL`,
    `FILE[:KEY.PATH]=LABEL#SEEDS` (only those seeds' draws of a run of several, e.g. `icl#21` or `icl#42,87`), either
    followed by `:METRIC` (this one's metric instead of `metric`, e.g. `metal#100:macro_f1_calibrated`)."""
    source, _, label = argument.rpartition("=")
    label, colon, own_metric = label.partition(":")
    if colon:
        metric = own_metric
    label, _, own_seeds = label.partition("#")
    if own_seeds:
        seeds = [int(seed) for seed in own_seeds.split(",")]
    if not source or not label:
        raise SystemExit(f"{argument!r}: expected FILE[:KEY.PATH]=LABEL, e.g. results.json=metal+refine@20.")
    path, _, key_path = source.partition(":")
    data = json.loads(Path(path).read_text())
    for key in filter(None, key_path.split(".")):
        data = data[int(key)] if isinstance(data, list) else data[key]  # a list's items by index: points.3
    records = data.get("results") or data.get("records") or []
    labelled = [record for record in records if method_label(record) == label and "error" not in record]
    if not labelled:
        labels = sorted({method_label(record) for record in records})
        raise SystemExit(f"{source} has no records labelled {label!r}; it has {labels}.")
    # A task can lack a metric another task has: macro_f1_calibrated where the options change from question to
    # question (no prior to divide out). Such tasks are left out of the pairing and named in the report.
    without = sorted(record["task"] for record in labelled if record.get(metric) is None)
    scores = {
        record["task"]: task_score(record, metric, seeds, data.get("settings", {}).get("seeds"))
        for record in labelled
        if record.get(metric) is not None
    }
    if not scores:
        raise SystemExit(f"{source}: no {label!r} record has {metric!r}.")
    settings = data.get("settings", {})
    name = Path(path).name + (f":{key_path}" if key_path else "")  # points.1 and points.2 of one file told apart
    used_seeds = seeds if seeds is not None else settings.get("seeds")
    shown = f"{label}:{metric}" if colon else label  # a row scored by its own metric says which
    return shown, scores, {
        "file": source, "name": name, "seeds": used_seeds, "queries": settings.get("queries"), "metric": metric,
        "tasks_without_metric": without,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="FILE[:KEY.PATH]=LABEL; the first against each of the others")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="paired_difference")
    parser.add_argument("--metric", default="score", help="score (the headline accuracy) or macro_f1 (MetaICL's)")
    parser.add_argument("--seeds", help="comma-separated: score only these seeds' draws (records must hold each)")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else None
    if len(args.runs) < 2:
        parser.error("give at least two runs: the first is compared with each of the others.")

    label, scores, source = records_of(args.runs[0], args.metric, seeds)
    comparisons = []
    for argument in args.runs[1:]:
        other_label, other, other_source = records_of(argument, args.metric, seeds)
        tasks = sorted(set(scores) & set(other))
        missing = sorted(set(scores) ^ set(other))
        if missing:
            raise SystemExit(f"{label} and {other_label} were not run on the same tasks: {missing} only in one.")
        differences = [scores[task] - other[task] for task in tasks]
        comparisons.append({
            "against": other_label, "source": other_source, "tasks": len(tasks),
            "mean": statistics.mean(differences), "se": statistics.stdev(differences) / math.sqrt(len(differences)),
            "wins": sum(d > 0 for d in differences), "ties": sum(d == 0 for d in differences),
            "losses": sum(d < 0 for d in differences), "per_task": dict(zip(tasks, differences)),
        })
    report = {**provenance(), "metric": args.metric, "seeds": seeds, "method": label, "source": source, "comparisons": comparisons}
    lines = [
        f"{label} against each method on the same tasks and questions ({args.metric}"
        + (f", seeds {args.seeds}" if seeds else "")
        + "): the mean per-task difference ± its standard error across tasks, and the tasks it wins, ties and loses.",
        "",
        f"| {label} (`{source['name']}`) minus | tasks | difference | wins / ties / losses |",
        "|---|---|---|---|",
    ]
    for row in comparisons:
        lines.append(
            f"| {row['against']} (`{row['source']['name']}`) | {row['tasks']} | {row['mean']:+.3f} ± {row['se']:.3f} | "
            f"{row['wins']} / {row['ties']} / {row['losses']} |"
        )
    left_out = sorted({task for row in [source, *(c["source"] for c in comparisons)] for task in row["tasks_without_metric"]})
    if left_out:
        lines += ["", f"Left out, having no score by the metric asked: {', '.join(left_out)}."]
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
