"""Means over several draws of the panel, with standard errors that count the draws: is a method's lead over another
larger than how much it moves from one draw of shots and queries to the next?

    python experiments/draw_spread.py \
        --series shipped benchmarks/results/learning_curve_text_stage.json:points.0=metal \
            benchmarks/results/dev_panel_fresh_draw_shipped.json=metal benchmarks/results/dev_panel_third_draw_shipped.json=metal \
        --series zero-shot benchmarks/results/precision_eval.json:runs.bf16=zero_shot \
            benchmarks/results/dev_panel_fresh_draw_references.json=zero_shot benchmarks/results/dev_panel_third_draw_shipped.json=zero_shot \
        [--name draw_spread]

Each `--series` is a name and one `FILE[:KEY.PATH]=LABEL` per draw (as `paired_difference.py` reads them), draws in
the same order in every series (`LABEL#SEEDS` picks some seeds of a run of several; `--metric macro_f1` for MetaICL's
panel; `LABEL:METRIC` scores one draw by a metric of its own, e.g. `metal#100:macro_f1_calibrated`). The tasks are fixed (the panel's); what is random is each draw's shots and queries.
So a series' error is, per task, the variance of its score across draws over the number of draws, summed over tasks,
square root, over the number of tasks; and each series is compared with the first draw by draw (the same shots and
queries), the per-task differences' spread across draws giving the error of the mean difference. Writes `<name>.json`
and `.md` under benchmarks/results.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
from paired_difference import records_of  # experiments/paired_difference.py
from report import provenance, write_report  # benchmarks/report.py

from peft_metal.evaluation.report import error_across_draws


def across_draws(draws: list[dict[str, float]]) -> tuple[float, float]:
    """(mean over draws and tasks, its standard error from each task's spread across draws)."""
    by_task = [[draw[task] for draw in draws] for task in sorted(draws[0])]
    return statistics.mean(statistics.mean(scores) for scores in by_task), error_across_draws(by_task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", nargs="+", action="append", required=True, metavar="NAME FILE=LABEL",
                        help="a name, then one FILE[:KEY.PATH]=LABEL per draw")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="draw_spread")
    parser.add_argument("--metric", default="score", help="score (the headline accuracy) or macro_f1 (MetaICL's)")
    args = parser.parse_args()

    series = {}
    for name, *draws in args.series:
        if len(draws) < 2:
            parser.error(f"series {name!r} has {len(draws)} draw(s): an error across draws needs at least two.")
        series[name] = [records_of(draw, args.metric) for draw in draws]
    counts = {name: len(draws) for name, draws in series.items()}
    if len(set(counts.values())) > 1:
        raise SystemExit(f"every series needs the same draws, in the same order: {counts}.")
    first_name, first = next(iter(series.items()))
    for name, draws in series.items():
        for index, ((_, scores, source), (_, first_scores, first_source)) in enumerate(zip(draws, first)):
            if set(scores) != set(first_scores):
                raise SystemExit(f"{name}, draw {index + 1} ({source['name']}) is not on {first_name}'s tasks.")
            if None not in (source["seeds"], first_source["seeds"]) and source["seeds"] != first_source["seeds"]:
                raise SystemExit(f"{name}, draw {index + 1}: seeds {source['seeds']}, {first_name}: {first_source['seeds']}.")

    rows = []
    for name, draws in series.items():
        scores = [draw[1] for draw in draws]
        mean, se = across_draws(scores)
        row = {"series": name, "draws": [draw[2] for draw in draws], "draw_means": [statistics.mean(s.values()) for s in scores],
               "mean": mean, "se_across_draws": se}
        if name != first_name:
            differences = [{task: f[1][task] - s[task] for task in s} for f, s in zip(first, scores)]
            row["difference_from_first"], row["difference_se"] = across_draws(differences)
        rows.append(row)
    report = {**provenance(), "metric": args.metric, "series": rows}
    lines = [
        f"Each series over {counts[first_name]} draws of the same tasks ({args.metric}): the mean of the draws' means, ± its standard "
        f"error from each task's spread across draws; and {first_name} minus each series draw by draw.",
        "",
        "| series | mean per draw | mean | ± across draws | " + f"{first_name} minus it |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        per_draw = " / ".join(f"{value:.3f}" for value in row["draw_means"])
        difference = (f"{row['difference_from_first']:+.3f} ± {row['difference_se']:.3f}"
                      if "difference_from_first" in row else "")
        lines.append(f"| {row['series']} | {per_draw} | {row['mean']:.3f} | {row['se_across_draws']:.3f} | {difference} |")
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
