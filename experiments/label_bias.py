"""How much of a method's macro-F1 deficit is a bias towards some labels? Scores the MetaICL dev panel's queries with
a method's context and picks each query's option three ways: as evaluation does (the highest mean log-probability per
answer token), and after dividing out a prior over the options (contextual calibration, Zhao et al. 2021) estimated
(a) from the task's own shots, each read as a query after the same context, or (b) from a content-free query ("N/A").

    PEFT_METAL_DATA=../shared python experiments/label_bias.py --pgm PGM --methods metal,icl --seeds 100 [--queries 100]

(a) needs only what a user gives (the shots), so it is a serving-time correction that a one-pass prompt could carry;
(b) is the usual baseline. Writes `<name>.json` and `.md` under benchmarks/results/metaicl: per task and method, the
macro-F1 under each rule and the share of predictions that go to the most predicted option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py)
import torch
from report import machine_description, provenance, write_markdown, write_report

import peft_metal  # noqa: F401
from peft_metal.data import Example
from peft_metal.data.corpora import corpus_dir
from peft_metal.evaluation.methods import PreparedMethod, option_ids, prepare_method, query_input, resolve_methods
from peft_metal.evaluation.metrics import macro_f1
from peft_metal.evaluation.panels import DEV_PANEL
from peft_metal.evaluation.tasks import load_panel_tasks
from peft_metal.inference import ModelParts, best_option, calibrated_pick, option_prior, score_options
from peft_metal.pgm import load_pgm
from peft_metal.precision import cast_frozen_weights

CONTENT_FREE = "N/A"
RULES = ("raw", "shots", "content_free")


def mean_logprobs(parts, tokenizer, prepared: PreparedMethod, inputs: Sequence[str], options: Sequence[str]) -> list[list[float]]:
    """Each option's mean log-probability per answer token (evaluation's rule) after the context and each input."""
    ids = option_ids(parts, tokenizer, options)
    rows = []
    for text in inputs:
        context, query = query_input(parts, tokenizer, prepared, text)
        rows.append([score.mean_logprob for score in score_options(parts.lm, context, [query], [ids])[0]])
    return rows


def task_record(parts, tokenizer, task, method: str, shots: Sequence[Example], queries: Sequence[Example], seed: int) -> dict[str, Any]:
    options = list(queries[0].options)
    if any(list(query.options) != options for query in queries):
        raise SystemExit(f"{task.name}: queries with different option lists; this probe needs one label set per task.")
    prepared = prepare_method(method, parts, tokenizer, shots, seed=seed)
    rows = mean_logprobs(parts, tokenizer, prepared, [q.input for q in queries], options)
    priors = {  # the product's rules (inference.calibration); "N/A" is Zhao et al.'s content-free input
        rule: option_prior([(options, row) for row in mean_logprobs(parts, tokenizer, prepared, inputs, options)])
        for rule, inputs in (("shots", [s.input for s in shots]), ("content_free", [CONTENT_FREE]))
    }
    golds = [query.output for query in queries]
    record: dict[str, Any] = {"task": task.name, "method": method, "seed": seed, "n": len(queries),
                              "metric": "macro_f1", "context_tokens": prepared.context_tokens}
    for rule in RULES:
        if rule == "raw":
            predicted = [options[best_option(row)] for row in rows]
        else:
            predicted = [calibrated_pick(options, row, priors[rule]) for row in rows]
        record[f"macro_f1_{rule}"] = macro_f1(predicted, golds)
        record[f"acc_{rule}"] = sum(p == g for p, g in zip(predicted, golds)) / len(golds)
        record[f"top_share_{rule}"] = Counter(predicted).most_common(1)[0][1] / len(predicted)
    record["gold_top_share"] = Counter(golds).most_common(1)[0][1] / len(golds)
    record["score"] = record["macro_f1_raw"]
    return record


def rule_table(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    """Task x (method, rule) macro-F1, each the mean over the records' seeds, with the means over tasks."""
    columns = [(method, rule) for method in methods for rule in RULES]
    tasks = list(dict.fromkeys(record["task"] for record in records))

    def mean(task: str | None, method: str, rule: str) -> float:
        values = [r[f"macro_f1_{rule}"] for r in records if r["method"] == method and task in (None, r["task"])]
        return sum(values) / len(values)

    lines = ["| task | " + " | ".join(f"{m} {rule}" for m, rule in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {task} | " + " | ".join(f"{mean(task, m, rule):.3f}" for m, rule in columns) + " |" for task in tasks]
    lines.append("| **mean** | " + " | ".join(f"**{mean(None, m, rule):.3f}**" for m, rule in columns) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pgm", required=True, help="a saved PGM folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="metal,icl")
    parser.add_argument("--queries", type=int, default=DEV_PANEL.queries)
    parser.add_argument("--seeds", default="100")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks/results/metaicl")
    parser.add_argument("--name", default="label_bias")
    parser.add_argument("--redraw", action="store_true", help="rewrite <name>.md from <name>.json, scoring nothing")
    args = parser.parse_args()
    if args.redraw:
        report = json.loads((args.output / f"{args.name}.json").read_text())
        methods = list(dict.fromkeys(record["method"] for record in report["records"]))
        caption = (args.output / f"{args.name}.md").read_text().split("\n\n")[0]
        write_markdown(args.output, args.name, [caption, "", *rule_table(report["records"], methods)])
        return

    seeds = tuple(int(seed) for seed in args.seeds.split(","))
    methods = resolve_methods(args.methods)
    panel = dataclasses.replace(DEV_PANEL, seeds=seeds)
    model, tokenizer, pgm = load_pgm(args.model, args.pgm, None, 0)
    model.eval()
    precision = cast_frozen_weights(model, "auto")
    tasks = load_panel_tasks(panel, corpus_dir("metaicl"))
    parts = ModelParts.from_model(model)
    records = []
    with parts.lora_off(), torch.no_grad():
        for seed in seeds:
            for task in tasks:
                shots, queries = task.split(DEV_PANEL.shots, args.queries, seed)
                for method in methods:
                    record = task_record(parts, tokenizer, task, method, shots, queries, seed)
                    records.append(record)
                    print(f"seed {seed} {task.name} {method}: " + ", ".join(
                        f"{rule} {record[f'macro_f1_{rule}']:.3f}" for rule in RULES), flush=True)
    means = {
        f"{method} {rule}": sum(r[f"macro_f1_{rule}"] for r in records if r["method"] == method)
        / sum(r["method"] == method for r in records)
        for method in methods for rule in RULES
    }
    caption = (
        f"Macro-F1 on the MetaICL dev panel ({len(tasks)} tasks, at most {args.queries} queries x seeds {list(seeds)}), "
        f"PGM `{pgm}`, {precision} frozen weights, each query's pick as scored (raw), or after dividing out the "
        f"option prior read from the task's own shots (shots) or from a content-free query (content_free). Means: "
        + ", ".join(f"{name} {value:.3f}" for name, value in means.items())
        + f" ({machine_description()})."
    )
    report = {**provenance(), "pgm": pgm, "precision": precision, "means": means, "records": records}
    write_report(args.output, args.name, report, [caption, "", *rule_table(records, methods)])


if __name__ == "__main__":
    main()
