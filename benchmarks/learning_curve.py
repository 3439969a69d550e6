"""Dev-panel accuracy of a meta-training run's checkpoints against the episodes they had seen: the learning curve.

    PEFT_METAL_DATA=../shared python benchmarks/learning_curve.py --run runs/smollm2-metaicl [--run ...]
        [--panel dev-panel | dev-panel-tasks | bigbench-panel] [--metric macro_f1 | score]
        [--checkpoints 60,240 | default: every checkpoint] [--untrained] [--methods metal,metal+demos] [--queries 100]
        [--refine-steps 20 --refine-lr 1e-2 (for metal+refine, metal+demos+refine)] [--calibration shots]
        [--references RESULTS.json] [--seeds 100,13 (some of the panel's draws)] [--name learning_curve]

A run continued from a saved PGM (`init_from`) counts the episodes that PGM had seen. Each checkpoint's PGM is scored with `evaluate` on the dev panel (its tasks, queries and seeds), frozen weights in the
precision `peft-metal eval` uses by default. Results are kept per (run, checkpoint, method) in the JSON and not
recomputed, so the script can be rerun as a run goes on (a session later, say) to add its new checkpoints. Points are merged into
the JSON under a lock file beside it, so scorings of other seeds or checkpoints may write one report side by side. Writes
`<name>.json`, `.md` and `.png`; zero-shot and ICL-16 from `--references` (a `peft-metal eval` results.json on the
same panel) are drawn as lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from report import (  # benchmarks/report.py: the JSON + markdown every benchmark leaves
    machine_description,
    write_markdown,
)

import peft_metal  # noqa: F401
from peft_metal.base_models import load_base_model
from peft_metal.evaluation import EvaluationSettings, evaluate_seeds
from peft_metal.evaluation.panels import BIGBENCH_PANEL, DEV_PANEL, PANELS, get_panel
from peft_metal.evaluation.report import summary
from peft_metal.evaluation.tasks import load_panel_tasks
from peft_metal.pgm import attach_pgm
from peft_metal.precision import cast_frozen_weights
from peft_metal.training import TrainingArguments
from peft_metal.training.checkpoint import CHECKPOINT_PREFIX
from peft_metal.training.trainer import build_pgm, episodes_seen


def checkpoints(run: Path, wanted: list[int] | None) -> list[tuple[int, Path]]:
    found = {
        int(path.name[len(CHECKPOINT_PREFIX) :]): path
        for path in run.glob(f"{CHECKPOINT_PREFIX}*")
        if path.name[len(CHECKPOINT_PREFIX) :].isdigit()
    }
    missing = sorted(set(wanted or []) - set(found))
    if missing:
        raise SystemExit(f"{run} has no checkpoint(s) {missing}; it has {sorted(found)}.")
    return [(step, found[step]) for step in sorted(wanted or found)]


def run_settings(run: Path) -> TrainingArguments:
    """The settings the run was trained with (how many episodes a step is, its model, what it started from)."""
    if not (run / "training_args.json").exists():
        raise SystemExit(f"{run}/training_args.json is missing: cannot tell how the run was trained.")
    return TrainingArguments(**json.loads((run / "training_args.json").read_text()))


def training_facts(checkpoint: Path | None) -> tuple[float | None, int]:
    """The run's wall-clock training seconds when it saved `checkpoint` (over every session, for equal-time
    comparisons) and how many processes trained it (each took its own episodes every step); the untrained start is
    0 seconds on one process."""
    if checkpoint is None:
        return 0.0, 1
    state = json.loads((checkpoint / "state.json").read_text())
    return state["extra"].get("train_seconds"), state.get("num_processes", 1)


def untrained_pgm(run: Path):
    """The PGM the trainer starts the run with, built from its settings with its seed: a fresh one, or with
    `grow_slots` its `init_from` PGM widened to the run's slots."""
    args = run_settings(run)
    torch.manual_seed(args.seed)
    return build_pgm(args)


def score(pgm: Path | None, tasks, settings: EvaluationSettings, run: Path, seeds: tuple[int, ...]) -> dict[str, Any]:
    """The dev panel on `pgm`; None is the PGM the run started from: its `init_from` PGM (widened, with
    `grow_slots`), else a fresh one."""
    args = run_settings(run)
    if pgm is None and (args.init_from is None or args.grow_slots):
        model, tokenizer = untrained_pgm(run)
    else:
        lm, tokenizer = load_base_model(args.model)
        model = attach_pgm(lm, str(pgm if pgm is not None else args.init_from))
    model.eval()
    precision = cast_frozen_weights(model, "auto")
    merged = evaluate_seeds(model, tokenizer, tasks, settings, seeds, progress=False)
    return {"precision": precision, "summary": summary(merged), "records": merged}


def seeds_label(point: dict[str, Any]) -> str:
    """The seeds a point was scored on (points written before `--seeds` existed used BIG-bench's panel's)."""
    return ",".join(str(seed) for seed in point.get("seeds", BIGBENCH_PANEL.seeds))


def point_value(stats: dict[str, Any], metric: str) -> tuple[float, float]:
    """A method's mean over the panel's tasks by `metric` (`score`: the headline accuracy), with its error."""
    return (stats["mean"], stats["se"]) if metric == "score" else (stats[metric], stats[f"{metric}_stderr"])


def plot(path: Path, points: list[dict[str, Any]], references: dict[str, float], metric: str, label: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    series: dict[tuple[str, str, str], list[tuple[int, float, float]]] = {}
    for point in points:
        for method, stats in point["summary"].items():
            key = (point["run"], method, seeds_label(point))
            if metric == "score" or metric in stats:
                series.setdefault(key, []).append((point["episodes"], *point_value(stats, metric)))
    for (run, method, seeds), values in series.items():
        values.sort()
        axes.errorbar([v[0] for v in values], [v[1] for v in values], yerr=[v[2] for v in values], marker="o",
                      capsize=3, label=f"{Path(run).name}: {method} (seeds {seeds})")
    for (label, value), style in zip(references.items(), ("--", ":", "-.")):
        axes.axhline(value, color="gray", linestyle=style, label=label)
    axes.set_xscale("symlog", linthresh=100)
    axes.set_xlabel("meta-training episodes")
    axes.set_ylabel(label)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def _report_lock(path: Path) -> FileLock:
    """The lock beside a report that every read and write of it holds (filelock, as the model cache uses)."""
    return FileLock(path.with_name(f".{path.name}.lock"))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"points": []}


def read_report(path: Path) -> dict[str, Any]:
    """The JSON report at `path` (empty if there is none), never half written."""
    if not path.parent.is_dir():
        return {"points": []}
    with _report_lock(path):
        return _load(path)


def update_report(path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply `change` to the JSON report at `path`, read afresh under its lock: two scorings writing to one report
    (say two draws side by side) then keep each other's points instead of overwriting them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _report_lock(path):
        report = _load(path)
        change(report)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_point(report: dict[str, Any], point: dict[str, Any]) -> None:
    key = (point["run"], point["step"], seeds_label(point))
    report["points"] = [p for p in report["points"] if (p["run"], p["step"], seeds_label(p)) != key] + [point]
    report["points"].sort(key=lambda p: (p["run"], seeds_label(p), p["step"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, action="append", required=True)
    parser.add_argument("--checkpoints", help="comma-separated steps (default: every checkpoint of every run)")
    parser.add_argument("--untrained", action="store_true", help="also score the PGM each run started from (step 0: its init_from PGM, else a fresh one)")
    parser.add_argument("--methods", default="metal,metal+demos")
    parser.add_argument("--panel", choices=list(PANELS), default=DEV_PANEL.name)
    parser.add_argument(
        "--metric", default="macro_f1",
        help="macro_f1 (MetaICL's), macro_f1_calibrated (with --calibration shots) or score (the headline accuracy)",
    )
    parser.add_argument(
        "--calibration", choices=("none", "shots"), default="none",
        help="shots: also score calibrated from the shots (points already in <name>.json are not rescored: use a new --name)",
    )
    parser.add_argument("--queries", type=int, help="queries per task and seed (default: the panel's)")
    parser.add_argument("--refine-steps", default="10", help="the refined methods' step count(s), as peft-metal eval")
    parser.add_argument("--refine-lr", type=float, help="the refined methods' Adam learning rate (default: refine_prompt's)")
    parser.add_argument("--references", type=Path, help="a `peft-metal eval` results.json with zero_shot and icl")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seeds", help="the seeds that draw each task's shots and queries (default: the panel's)")
    parser.add_argument("--name", default="learning_curve")
    args = parser.parse_args()
    panel = get_panel(args.panel)
    seeds = tuple(int(seed) for seed in args.seeds.split(",")) if args.seeds else panel.seeds

    path = args.output / f"{args.name}.json"
    done = {(p["run"], p["step"], seeds_label(p)) for p in read_report(path)["points"]}
    tasks = load_panel_tasks(panel)
    settings = EvaluationSettings(
        args.methods, panel.shots, args.queries or panel.queries, refine_steps=args.refine_steps, refine_lr=args.refine_lr,
        calibration=args.calibration,
    )
    wanted = [int(step) for step in args.checkpoints.split(",")] if args.checkpoints else None
    for run in args.run:
        points = checkpoints(run, wanted)
        if args.untrained:
            points.insert(0, (0, None))
        for step, folder in points:
            if (str(run), step, seeds_label({"seeds": seeds})) in done:
                continue
            print(f"scoring {run} step {step}, seeds {seeds} ...", flush=True)
            result = score(folder / "pgm" if folder is not None else None, tasks, settings, run, seeds)
            seconds, processes = training_facts(folder)
            episodes = episodes_seen(run_settings(run), step, processes)
            point = {"run": str(run), "step": step, "seeds": list(seeds), "episodes": episodes, "train_seconds": seconds}
            # kept after every checkpoint (resumable), merged with what others wrote meanwhile
            update_report(path, lambda report: add_point(report, {**point, **result}))

    references = {}
    if args.references is not None:
        scored = json.loads(args.references.read_text())["summary"]
        references = {f"{m} ({panel.name})": point_value(scored[m], args.metric)[0] for m in ("zero_shot", "icl") if m in scored}
    report = update_report(
        path,
        lambda report: report.update(
            command="python benchmarks/learning_curve.py " + " ".join(sys.argv[1:]),
            machine=machine_description(),
            references=references,
            panel=panel.name,
            metric=args.metric,
        ),
    )
    # columns as the evaluation report labels them (a refined method per step count: metal+refine@20)
    methods = list(dict.fromkeys(label for point in report["points"] for label in point["summary"]))
    lines = [
        f"{panel.name} (at most {panel.questions} questions), PGM checkpoints of each run, each task's shots and "
        f"queries drawn by the seeds named; mean {args.metric} over tasks ± one standard error ({machine_description()}).",
        "",
        "| run | seeds | step | episodes | training seconds (this run) | " + " | ".join(methods) + " |",
        "|---|---|---|---|---|" + "---|" * len(methods),
    ]
    for point in report["points"]:
        values = {m: point_value(point["summary"][m], args.metric) for m in methods if m in point["summary"]}
        cells = [f"{values[m][0]:.3f} ± {values[m][1]:.3f}" if m in values else "-" for m in methods]
        seconds = f"{point['train_seconds']:,.0f}" if point.get("train_seconds") is not None else "-"
        lines.append(
            f"| {Path(point['run']).name} | {seeds_label(point)} | {point['step']} | {point['episodes']} | {seconds} | "
            + " | ".join(cells) + " |"
        )
    lines += ["", "References: " + ", ".join(f"{k} {v:.3f}" for k, v in references.items())] if references else []
    write_markdown(args.output, args.name, lines)
    plot(args.output / f"{args.name}.png", report["points"], references, args.metric, f"{panel.name} {args.metric}")


if __name__ == "__main__":
    main()
