"""Writing evaluation records: `results.json`, a markdown table `results.md` and a bar plot `results.png` beside it.

Metrics carry lm-eval's names and standard errors (`acc`, `acc_stderr`, ...; see `metrics`); a record's `metric`
names the one its `score` is.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from .metrics import (
    ACC_CALIBRATED,
    CALIBRATION_NOTE,
    DRAW_METRICS,
    GENERATIVE_METRICS,
    MACRO_F1,
    MACRO_F1_CALIBRATED,
    MULTIPLE_CHOICE_METRICS,
    mean_stderr,
)
from .settings import DEFAULT_SHOTS

METRIC_NAMES = MULTIPLE_CHOICE_METRICS + (MACRO_F1, ACC_CALIBRATED, MACRO_F1_CALIBRATED) + GENERATIVE_METRICS


def method_label(record: dict[str, Any]) -> str:
    """The column a record goes in: its method, with the step count for metal+refine (`metal+refine@10`), so a
    run over several step counts keeps one column per count."""
    if "refine_steps" in record:
        return f"{record['method']}@{record['refine_steps']}"
    return record["method"]


def _methods(results: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(method_label(record) for record in results))


def _tasks(results: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(record["task"] for record in results))


def _ok(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in results if "error" not in record]


def standard_error(record: dict[str, Any]) -> float:
    """The standard error of a record's score: its metric's `_stderr`, else (records written before those existed)
    the sample standard error of a 0/1 score over its `n` questions, as lm-eval computes it; nan when unknown."""
    stderr = record.get(f"{record.get('metric')}_stderr")
    if stderr is not None:
        return stderr
    n, p = record.get("n"), record["score"]
    return math.sqrt(p * (1 - p) / (n - 1)) if n and n > 1 else math.nan


def summary(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: mean score over tasks, its standard error (per-task errors combined as independent), tasks,
    questions, and each metric's mean and standard error (`acc`, `acc_stderr`, ...) over the tasks that have it."""
    table = {}
    for method in _methods(results):
        records = [record for record in _ok(results) if method_label(record) == method]
        if records:
            table[method] = {
                "mean": sum(record["score"] for record in records) / len(records),
                "se": math.sqrt(sum(standard_error(record) ** 2 for record in records)) / len(records),
                "tasks": len(records),
                "questions": sum(record.get("n", 0) for record in records),
            }
            for name in METRIC_NAMES:
                stats = metric_means(records, name)
                if stats is not None:
                    table[method][name], table[method][f"{name}_stderr"] = stats[0], stats[1]
            draws = draw_standard_error(records)
            if draws is not None:
                table[method]["draw_se"] = draws
    return table


def draw_standard_error(records: Sequence[dict[str, Any]]) -> Optional[float]:
    """The standard error of the mean score over tasks that counts each seed's draw of shots *and* queries, from how
    much each task's seeds disagree (the sample variance of its per-seed scores); `se` counts the questions alone,
    but a prompt made from the shots moves with their draw. None unless every record has two or more seed scores."""
    if not records or any(len(record.get("seed_scores", ())) < 2 for record in records):
        return None
    return error_across_draws([record["seed_scores"] for record in records])


def error_across_draws(scores_by_task: Sequence[Sequence[float]]) -> float:
    """The standard error of the mean over fixed tasks of each task's mean over its draws: per task, the sample
    variance of its draws' scores over their number, summed over tasks, square root, over the number of tasks."""
    variance = 0.0
    for scores in scores_by_task:
        mean = sum(scores) / len(scores)
        variance += sum((score - mean) ** 2 for score in scores) / (len(scores) - 1) / len(scores)
    return math.sqrt(variance) / len(scores_by_task)


def merge_seeds(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per task and method from runs over several seeds: scores weighted by questions, `n` and times
    summed over seeds (context tokens averaged), `seeds` listing them; an error in any seed makes the merged record
    an error."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in results:
        groups.setdefault((record["task"], method_label(record)), []).append(record)
    merged = []
    for records in groups.values():
        first = records[0]
        errors = [record for record in records if "error" in record]
        if errors:
            merged.append({**errors[0], "seeds": [record.get("seed") for record in records]})
            continue
        n = sum(record["n"] for record in records)
        combined = dict(first, n=n, seeds=[record.get("seed") for record in records])
        combined.pop("seed", None)
        if len(records) > 1:
            combined["seed_scores"] = [record["score"] for record in records]
        for key, value in first.items():
            if key in ("n", "seed") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key.endswith("seconds"):
                combined[key] = sum(record[key] for record in records)
            elif key in DRAW_METRICS:  # a property of each seed's draw: the mean over draws, with the draws' error
                draws = [record[key] for record in records]
                combined[key], combined[f"{key}_stderr"] = mean_stderr(draws)
                combined[f"{key}_seed_scores"] = draws
            elif key == "score" or key in METRIC_NAMES:
                combined[key] = sum(record[key] * record["n"] for record in records) / n
                if key in METRIC_NAMES:
                    combined[f"{key}_stderr"] = _pooled_stderr(records, key, combined[key])
            elif key == "context_tokens":
                combined[key] = sum(record[key] for record in records) / len(records)
        merged.append(combined)
    return merged


def _pooled_stderr(records: Sequence[dict[str, Any]], key: str, mean: float) -> Optional[float]:
    """The standard error of `key` over all questions of several seeds, from each seed's mean and standard error:
    each seed's sum of squares is recovered from its error (sample variance = stderr^2 * n) and pooled around the
    overall mean, giving what lm-eval would report on the pooled questions."""
    n = sum(record["n"] for record in records)
    if n < 2:
        return None
    squares = 0.0
    for record in records:
        stderr = record.get(f"{key}_stderr") or 0.0  # None: a single question, no spread of its own
        squares += stderr**2 * record["n"] * (record["n"] - 1) + record["n"] * (record[key] - mean) ** 2
    return math.sqrt(squares / (n - 1) / n)


def mean_scores(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean score per method (`method_label`) over the tasks where it ran (errors left out), in first-seen order."""
    means = {}
    for method in _methods(results):
        scores = [record["score"] for record in _ok(results) if method_label(record) == method]
        if scores:
            means[method] = sum(scores) / len(scores)
    return means


def _mean(records: Sequence[dict[str, Any]], key: str) -> float:
    values = [record[key] for record in records if key in record]
    return sum(values) / len(values) if values else math.nan


def metric_means(records: Sequence[dict[str, Any]], name: str) -> Optional[tuple[float, float, int]]:
    """(mean over the records that have metric `name`, its standard error with per-task errors combined as
    independent, how many records), or None when none has it."""
    having = [record for record in records if name in record]
    if not having:
        return None
    errors = [record.get(f"{name}_stderr") for record in having]
    se = math.sqrt(sum(e**2 for e in errors)) / len(having) if None not in errors else math.nan
    return sum(record[name] for record in having) / len(having), se, len(having)


def _with_error(value: str, stderr: float) -> str:
    """A table cell: the value ± its standard error, or the value alone where the error is unknown (one seed's
    macro-F1 has none)."""
    return value if math.isnan(stderr) else f"{value} ± {stderr:.3f}"


def metrics_table(results: Sequence[dict[str, Any]]) -> list[str]:
    """Lines of a method x metric table (lm-eval's names; mean over tasks ± standard error), empty when no record
    carries these metrics (records written before they existed)."""
    names = [name for name in METRIC_NAMES if any(name in record for record in _ok(results))]
    if not names:
        return []
    lines = ["", "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method in _methods(results):
        records = [record for record in _ok(results) if method_label(record) == method]
        cells = []
        for name in names:
            stats = metric_means(records, name)
            cells.append(_with_error(f"{stats[0]:.3f}", stats[1]) if stats else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def draw_metric_table(results: Sequence[dict[str, Any]], name: str = MACRO_F1) -> list[str]:
    """Lines of a task x method table of a per-draw metric (MetaICL's macro-F1, or its calibrated twin), each cell
    the mean over seeds ± the standard error across them, with the means over tasks; empty when no record has it."""
    if not any(name in record for record in _ok(results)):
        return []
    methods, tasks = _methods(results), _tasks(results)
    by_key = {(record["task"], method_label(record)): record for record in _ok(results)}

    def cell(record: Optional[dict[str, Any]]) -> str:
        if record is None or name not in record:
            return "-"
        stderr = record.get(f"{name}_stderr")
        return f"{record[name]:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")

    title = {MACRO_F1: "macro-F1", MACRO_F1_CALIBRATED: "macro-F1 calibrated from the shots"}[name]
    lines = ["", f"{title} (± across seeds' draws):", "", "| task | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    lines += [f"| {task} | " + " | ".join(cell(by_key.get((task, m))) for m in methods) + " |" for task in tasks]
    means = [metric_means([r for r in _ok(results) if method_label(r) == m], name) for m in methods]
    lines.append("| **mean** | " + " | ".join(_with_error(f"**{s[0]:.3f}**", s[1]) if s else "-" for s in means) + " |")
    return lines


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """Task x method scores (the headline metric named in the metric column: `acc_per_token` for multiple choice,
    `exact_match` for generative), their means per method with standard errors (± one standard error, per-task errors
    combined), each metric's mean per method, the cost of each method, and any errors."""
    methods, tasks = _methods(results), _tasks(results)
    by_key = {(record["task"], method_label(record)): record for record in results}
    lines = ["| task | metric | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for task in tasks:
        records = [by_key.get((task, method)) for method in methods]
        metric = next((r["metric"] for r in records if r and "metric" in r), "-")
        cells = []
        for record in records:
            if record is None:
                cells.append("-")
            elif "error" in record:
                cells.append("error")
            elif "token_f1" in record:
                cells.append(f"{record['score']:.3f} (F1 {record['token_f1']:.3f})")
            else:
                cells.append(f"{record['score']:.3f}")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    means = summary(results)
    lines.append(
        "| **mean** | | "
        + " | ".join(f"**{means[m]['mean']:.3f}** ± {means[m]['se']:.3f}" if m in means else "-" for m in methods)
        + " |"
    )
    lines.append("| questions | | " + " | ".join(str(means[m]["questions"]) if m in means else "-" for m in methods) + " |")
    if any("draw_se" in stats for stats in means.values()):
        lines.append(
            "| ± across seeds' draws | | "
            + " | ".join(f"{means[m]['draw_se']:.3f}" if "draw_se" in means.get(m, {}) else "-" for m in methods)
            + " |"
        )

    lines += metrics_table(results)
    for name in DRAW_METRICS:
        lines += draw_metric_table(results, name)
    lines += ["", "| method | tasks | mean prompt s | mean context tokens | mean eval s |", "|---|---|---|---|---|"]
    for method in methods:
        records = [record for record in _ok(results) if method_label(record) == method]
        lines.append(
            f"| {method} | {len(records)} | {_mean(records, 'prompt_seconds'):.3f} | "
            f"{_mean(records, 'context_tokens'):.1f} | {_mean(records, 'eval_seconds'):.3f} |"
        )
    notes = [record for record in _ok(results) if CALIBRATION_NOTE in record]
    if notes:
        lines += ["", "Not calibrated:", ""]
        lines += [f"- {record['task']} / {method_label(record)}: {record[CALIBRATION_NOTE]}" for record in notes]
    errors = [record for record in results if "error" in record]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {record['task']} / {method_label(record)}: {record['error']}" for record in errors]
    return "\n".join(lines) + "\n"


def plot_means(results: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """A bar plot of the mean score per method, drawn with the Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    means = mean_scores(results)
    figure = Figure(figsize=(max(4.0, 1.2 * len(means) + 2), 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bars = axes.bar(list(means), list(means.values()), color="#4c72b0")
    axes.bar_label(bars, fmt="%.3f")
    axes.set_ylabel("mean score over tasks")
    axes.set_ylim(0, max([1.0, *means.values()]) * 1.1)
    axes.set_title(f"{len(_tasks(_ok(results)))} task(s)")
    figure.tight_layout()
    figure.savefig(os.fspath(path))


def write_results(
    results: Sequence[dict[str, Any]], path: str | os.PathLike, settings: Optional[dict[str, Any]] = None
) -> dict[str, Path]:
    """Write `{"results": [...]}` (plus `"settings"` when given) to `path`, and `.md`/`.png` with the same stem."""
    path = Path(path)
    if path.suffix.lower() in (".md", ".png"):
        raise ValueError(f"{path}: give the JSON path (e.g. results.json); the .md and .png are written beside it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"results": list(results), "summary": summary(results)}
    if settings is not None:
        payload["settings"] = settings
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    markdown, plot = path.with_suffix(".md"), path.with_suffix(".png")
    markdown.write_text(markdown_table(results), encoding="utf-8")
    plot_means(results, plot)
    return {"json": path, "markdown": markdown, "plot": plot}


def labelled_means(path: str | os.PathLike) -> dict[str, float]:
    """The mean score of each method in a `results.json`, labelled with where it was measured (the panel or the
    number of tasks, the seeds that drew the shots and queries, and the shots unless MetaICL's 16), so a model card
    that quotes several draws of the same panel says which figure is which: `{"metal (dev-panel, seeds 0,1)": 0.511,
    "metal (dev-panel, seeds 0,1, 4 shots)": 0.47, ...}`; with macro-F1 in the records, also
    `"metal macro-F1 (dev-panel, ...)"`."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    if "summary" not in payload:
        raise ValueError(f"{path} has no 'summary': give a results.json written by `peft-metal eval`.")
    settings = payload.get("settings") or {}
    where = [settings.get("panel") or (f"{len(settings['tasks'])} tasks" if settings.get("tasks") else None)]
    if settings.get("seeds") is not None:
        where.append("seeds " + ",".join(str(seed) for seed in settings["seeds"]))
    if settings.get("shots") not in (None, DEFAULT_SHOTS):
        where.append(f"{settings['shots']} shots")
    label = ", ".join(part for part in where if part)
    suffix = f" ({label})" if label else ""
    means = {}
    for method, stats in payload["summary"].items():
        means[f"{method}{suffix}"] = round(stats["mean"], 4)
        if MACRO_F1 in stats:  # MetaICL's metric, beside the accuracy
            means[f"{method} macro-F1{suffix}"] = round(stats[MACRO_F1], 4)
        if MACRO_F1_CALIBRATED in stats:
            means[f"{method} macro-F1 calibrated{suffix}"] = round(stats[MACRO_F1_CALIBRATED], 4)
    return means
