"""The learning curve of one chain of PGMs, each run continuing the last one's exported PGM (`init_from`), across
runs and sessions: the issue's "dev-panel accuracy of `metal` after 1k, 3k, 10k, 30k episodes".

    python experiments/chain_curve.py \\
        --segment benchmarks/results/learning_curve.json:runs/smollm2-compressed:0-0 \\
        --segment benchmarks/results/learning_curve.json:runs/smollm2-compressed-ce:60-450 \\
        ... [--method metal] [--seeds 0,1] [--name learning_curve_chain]

    python experiments/chain_curve.py --metric macro_f1 --draws 100,13,21,42,87 --recipe-from 5400 \\
        --segment A.json+A_seeds21_42_87.json:runs/probe:200-200 --segment B.json+B_seeds21_42_87.json:runs/long \\
        --reference ICL-16 dev_panel_shipped.json=icl#100 dev_panel_shipped.json=icl#13 ... [--name ...]

Nothing is scored here: each segment takes the points `learning_curve.py` already wrote for one run (within a range of
steps: a run is part of the chain up to the checkpoint the next run started from), so the curve can be redrawn as a
run goes on. Episodes are as `learning_curve.py` counts them, the chain's earlier episodes included; `--recipe-from`
names how many of them came before the recipe the curve is about, and the milestones count the recipe's own.

With `--draws`, a point is a checkpoint's mean over those seeds' draws (its error from each task's spread across
them, as `draw_spread.py` counts it), gathered from every file of its segment (`A.json+B.json`: one scoring per set
of seeds); a checkpoint not scored on every draw is left out and named. References are then `--reference NAME
FILE=LABEL#SEED ...`, one per draw, as `draw_spread.py` reads them. Writes `<name>.json`, `.md` and `.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
from draw_spread import across_draws  # experiments/draw_spread.py
from learning_curve import point_value, seeds_label
from paired_difference import records_of, task_score  # experiments/paired_difference.py
from report import machine_description, write_report

from peft_metal.evaluation.report import method_label

MILESTONES = (1_000, 3_000, 10_000, 30_000)


def parse_segment(text: str) -> tuple[list[Path], str, int, int]:
    """`FILE[+FILE...]:RUN[:FIRST-LAST]` → (files, run, first step, last step)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--segment {text!r}: expected FILE:RUN or FILE:RUN:FIRST-LAST (steps).")
    first, last = 0, sys.maxsize
    if len(parts) == 3:
        try:
            first, last = (int(step) for step in parts[2].split("-"))
        except ValueError:
            raise SystemExit(f"--segment {text!r}: the steps must read FIRST-LAST, e.g. 60-450.") from None
    return [Path(name) for name in parts[0].split("+")], parts[1], first, last


def segment_points(text: str, method: str, metric: str, seeds: str, draws: list[int] | None) -> list[dict[str, Any]]:
    """The segment's points: as scored on `seeds`, or (with `draws`) each checkpoint's mean over those draws."""
    paths, run, first, last = parse_segment(text)
    scored = []
    for path in paths:
        if not path.exists():
            raise SystemExit(f"--segment {text!r}: {path} does not exist; score the run with learning_curve.py first.")
        scored += [
            (path, point) for point in json.loads(path.read_text())["points"]
            if point["run"] == run and first <= point["step"] <= last and method in point["summary"]
        ]
    points = []
    for step in sorted({point["step"] for _, point in scored}):
        at_step = [(path, point) for path, point in scored if point["step"] == step]
        if draws is None:
            found = [(path, point) for path, point in at_step if seeds_label(point) == seeds]
            if found:
                path, point = found[0]
                mean, se = point_value(point["summary"][method], metric)
                points.append({"run": run, "step": step, "episodes": point["episodes"], "seeds": seeds, "mean": mean,
                               "se": se, "source": str(path)})
            continue
        per_draw = {}
        for path, point in at_step:
            records = [record for record in point["records"] if method_label(record) == method and "error" not in record]
            for seed in point["seeds"]:
                if seed in draws:
                    per_draw[seed] = {record["task"]: task_score(record, metric, [seed], point["seeds"]) for record in records}
        missing = [seed for seed in draws if seed not in per_draw]
        if missing:
            print(f"{run} step {step}: left out, not scored on seed(s) {missing}")
            continue
        mean, se = across_draws([per_draw[seed] for seed in draws])
        points.append({"run": run, "step": step, "episodes": at_step[0][1]["episodes"], "seeds": ",".join(map(str, draws)),
                       "mean": mean, "se": se, "source": "+".join(sorted({str(path) for path, _ in at_step}))})
    if not points:
        raise SystemExit(f"--segment {text!r}: no {method} point of {run} in those steps on seeds {seeds if draws is None else draws}.")
    return points


def reference_value(name: str, draws: list[str], metric: str) -> float:
    """A method's mean over draws (`FILE=LABEL#SEED`, one per draw, as `draw_spread.py` reads them)."""
    if len(draws) < 2:
        raise SystemExit(f"--reference {name!r}: give one FILE=LABEL#SEED per draw (at least two).")
    return across_draws([records_of(draw, metric)[1] for draw in draws])[0]


def plot(path: Path, points: list[dict[str, Any]], references: dict[str, float], label: str, recipe_from: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([p["recipe_episodes"] for p in points], [p["mean"] for p in points], color="lightgray", zorder=1)
    for run in dict.fromkeys(p["run"] for p in points):
        mine = [p for p in points if p["run"] == run]
        axes.errorbar([p["recipe_episodes"] for p in mine], [p["mean"] for p in mine], yerr=[p["se"] for p in mine],
                      marker="o", linestyle="none", capsize=3, label=Path(run).name, zorder=2)
    styles = zip(("--", ":", "-.", "--"), ("gray", "gray", "gray", "tab:red"))
    for (name, value), (style, color) in zip(references.items(), styles):
        axes.axhline(value, color=color, linestyle=style, label=name)
    for milestone in MILESTONES:
        axes.axvline(milestone, color="lightgray", linestyle=":", linewidth=0.8)
    axes.set_xscale("symlog", linthresh=100)
    first, last = min(p["recipe_episodes"] for p in points), max(p["recipe_episodes"] for p in points)
    axes.set_xlim(first / 2, max(last, MILESTONES[-1]) * 1.5)  # the points and every milestone, no empty negative side
    axes.set_xlabel("meta-training episodes" + (f" of the recipe (after the chain's first {recipe_from:,})" if recipe_from else ""))
    axes.set_ylabel(label)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segment", action="append", required=True, help="FILE:RUN[:FIRST-LAST], in chain order")
    parser.add_argument("--method", default="metal")
    parser.add_argument("--metric", default="score", help="score (the headline accuracy), macro_f1 or macro_f1_calibrated")
    parser.add_argument("--seeds", default="0,1", help="the panel draw the points were scored on")
    parser.add_argument("--draws", help="comma-separated seeds: each point the mean over these draws (see above)")
    parser.add_argument("--recipe-from", type=int, default=0, help="the chain's episodes before the recipe's first")
    parser.add_argument("--references", type=Path, default=Path("benchmarks/results/precision_eval.json"),
                        help="without --draws: a BIG-bench-panel precision_eval.json for zero-shot and ICL-16")
    parser.add_argument("--reference", nargs="+", action="append", default=[], metavar="NAME FILE=LABEL#SEED",
                        help="with --draws: a line at a method's mean over the draws, one FILE=LABEL#SEED per draw")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="learning_curve_chain")
    args = parser.parse_args()

    draws = [int(seed) for seed in args.draws.split(",")] if args.draws else None
    points = [
        point for segment in args.segment for point in segment_points(segment, args.method, args.metric, args.seeds, draws)
    ]
    for before, after in zip(points, points[1:]):
        if after["episodes"] < before["episodes"]:
            raise SystemExit(
                f"the segments are not in chain order: {after['run']} step {after['step']} ({after['episodes']} "
                f"episodes) follows {before['run']} step {before['step']} ({before['episodes']})."
            )
    references = {}
    if draws is not None:
        references = {name: reference_value(name, runs, args.metric) for name, *runs in args.reference}
    elif args.references.exists():
        scored = json.loads(args.references.read_text())["runs"]["bf16"]["summary"]
        references = {f"{m} (dev panel)": scored[m]["mean"] for m in ("zero_shot", "icl") if m in scored}
    for point in points:
        point["recipe_episodes"] = point["episodes"] - args.recipe_from
    report = {
        "command": "python experiments/chain_curve.py " + " ".join(sys.argv[1:]),
        "machine": machine_description(),
        "method": args.method,
        "metric": args.metric,
        "recipe_from": args.recipe_from,
        "points": points,
        "references": references,
    }
    seeds = args.draws or args.seeds
    lines = [
        f"Dev panel `{args.method}`, {args.metric} (seeds {seeds}) along one chain of PGMs, each run continuing the "
        "last; episodes count the whole chain, the recipe's count those after its first "
        f"{args.recipe_from:,}. Mean ± one standard error"
        + (" across the draws." if draws is not None else "."),
        "",
        "| run | step | episodes | the recipe's episodes | " + args.method + " |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {Path(p['run']).name} | {p['step']} | {p['episodes']:,} | {p['recipe_episodes']:,} | {p['mean']:.3f} ± {p['se']:.3f} |"
        for p in points
    ]
    reached = [m for m in MILESTONES if points[-1]["recipe_episodes"] >= m]
    nearest = [min(points, key=lambda p, m=m: abs(p["recipe_episodes"] - m)) for m in reached]
    lines += ["", "Nearest point to each milestone reached: " + ", ".join(
        f"{m:,}: {p['mean']:.3f} ({p['recipe_episodes']:,} episodes)" for m, p in zip(reached, nearest)
    )]
    lines += ["", "References: " + ", ".join(f"{k} {v:.3f}" for k, v in references.items())] if references else []
    write_report(args.output, args.name, report, lines)
    plot(args.output / f"{args.name}.png", points, references, f"dev panel, {args.method} {args.metric}", args.recipe_from)


if __name__ == "__main__":
    main()
