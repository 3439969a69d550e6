"""The learning curve of one chain of PGMs, each run continuing the last one's exported PGM (`init_from`), across
runs and sessions: the issue's "dev-panel accuracy of `metal` after 1k, 3k, 10k, 30k episodes".

    python experiments/chain_curve.py \\
        --segment benchmarks/results/learning_curve.json:runs/smollm2-compressed:0-0 \\
        --segment benchmarks/results/learning_curve.json:runs/smollm2-compressed-ce:60-450 \\
        ... [--method metal] [--seeds 0,1] [--name learning_curve_chain]

Nothing is scored here: each segment takes the points `learning_curve.py` already wrote for one run (within a range of
steps: a run is part of the chain up to the checkpoint the next run started from), so the curve can be redrawn as a
run goes on. Episodes are as `learning_curve.py` counts them, the chain's earlier episodes included. Writes
`<name>.json`, `.md` and `.png`, with zero-shot and ICL-16 from `--references` as lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
from learning_curve import seeds_label
from report import machine_description, write_report

MILESTONES = (1_000, 3_000, 10_000, 30_000)


def parse_segment(text: str) -> tuple[Path, str, int, int]:
    """`FILE:RUN[:FIRST-LAST]` → (file, run, first step, last step)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--segment {text!r}: expected FILE:RUN or FILE:RUN:FIRST-LAST (steps).")
    first, last = 0, sys.maxsize
    if len(parts) == 3:
        try:
            first, last = (int(step) for step in parts[2].split("-"))
        except ValueError:
            raise SystemExit(f"--segment {text!r}: the steps must read FIRST-LAST, e.g. 60-450.") from None
    return Path(parts[0]), parts[1], first, last


def segment_points(text: str, method: str, seeds: str) -> list[dict[str, Any]]:
    path, run, first, last = parse_segment(text)
    if not path.exists():
        raise SystemExit(f"--segment {text!r}: {path} does not exist; score the run with learning_curve.py first.")
    points = [
        {
            "run": run,
            "step": point["step"],
            "episodes": point["episodes"],
            "seeds": seeds,
            "mean": point["summary"][method]["mean"],
            "se": point["summary"][method]["se"],
            "source": str(path),
        }
        for point in json.loads(path.read_text())["points"]
        if point["run"] == run and first <= point["step"] <= last and seeds_label(point) == seeds
        and method in point["summary"]
    ]
    if not points:
        raise SystemExit(f"--segment {text!r}: {path} has no {method} point of {run} in those steps on seeds {seeds}.")
    return sorted(points, key=lambda point: point["step"])


def plot(path: Path, points: list[dict[str, Any]], references: dict[str, float], method: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([p["episodes"] for p in points], [p["mean"] for p in points], color="lightgray", zorder=1)
    for run in dict.fromkeys(p["run"] for p in points):
        mine = [p for p in points if p["run"] == run]
        axes.errorbar([p["episodes"] for p in mine], [p["mean"] for p in mine], yerr=[p["se"] for p in mine],
                      marker="o", linestyle="none", capsize=3, label=Path(run).name, zorder=2)
    for (label, value), style in zip(references.items(), ("--", ":")):
        axes.axhline(value, color="gray", linestyle=style, label=label)
    for milestone in MILESTONES:
        axes.axvline(milestone, color="lightgray", linestyle=":", linewidth=0.8)
    axes.set_xscale("symlog", linthresh=100)
    axes.set_xlabel("meta-training episodes (the chain's, earlier runs included)")
    axes.set_ylabel(f"dev panel, {method}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segment", action="append", required=True, help="FILE:RUN[:FIRST-LAST], in chain order")
    parser.add_argument("--method", default="metal")
    parser.add_argument("--seeds", default="0,1", help="the panel draw the points were scored on")
    parser.add_argument("--references", type=Path, default=Path("benchmarks/results/precision_eval.json"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="learning_curve_chain")
    args = parser.parse_args()

    points = [point for segment in args.segment for point in segment_points(segment, args.method, args.seeds)]
    for before, after in zip(points, points[1:]):
        if after["episodes"] < before["episodes"]:
            raise SystemExit(
                f"the segments are not in chain order: {after['run']} step {after['step']} ({after['episodes']} "
                f"episodes) follows {before['run']} step {before['step']} ({before['episodes']})."
            )
    references = {}
    if args.references.exists():
        scored = json.loads(args.references.read_text())["runs"]["bf16"]["summary"]
        references = {f"{m} (dev panel)": scored[m]["mean"] for m in ("zero_shot", "icl") if m in scored}
    report = {
        "command": "python experiments/chain_curve.py " + " ".join(sys.argv[1:]),
        "machine": machine_description(),
        "method": args.method,
        "points": points,
        "references": references,
    }
    lines = [
        f"Dev panel `{args.method}` (seeds {args.seeds}) along one chain of PGMs, each run continuing the last; "
        "episodes count the whole chain. Mean accuracy ± one standard error.",
        "",
        "| run | step | episodes | " + args.method + " |",
        "|---|---|---|---|",
    ]
    lines += [f"| {Path(p['run']).name} | {p['step']} | {p['episodes']:,} | {p['mean']:.3f} ± {p['se']:.3f} |" for p in points]
    reached = [m for m in MILESTONES if points[-1]["episodes"] >= m]
    nearest = [min(points, key=lambda p, m=m: abs(p["episodes"] - m)) for m in reached]
    lines += ["", "Nearest point to each milestone reached: " + ", ".join(
        f"{m:,}: {p['mean']:.3f} ({p['episodes']:,} episodes)" for m, p in zip(reached, nearest)
    )]
    lines += ["", "References: " + ", ".join(f"{k} {v:.3f}" for k, v in references.items())] if references else []
    write_report(args.output, args.name, report, lines)
    plot(args.output / f"{args.name}.png", points, references, args.method)


if __name__ == "__main__":
    main()
