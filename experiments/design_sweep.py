"""Which prompt design (and does distillation help)? Each run meta-trains a fresh PGM for the same budget from one base
config, then scores it with `metal` on dev tasks, untrained (step 0, same seed) and trained.

    python experiments/design_sweep.py [--config experiments/configs/train_smollm2_prefix.json] [--max-steps 30]
        [--designs discrete,weighted_sum,hidden_state,prefix] [--distill discrete] [--distillation-weight 1.0]
        [--num-prompt-tokens K | default: the config's] [--tasks a,b | default: the dev MC tasks] [--shots 16]
        [--queries 30] [--runs-dir runs/design_sweep] [--output benchmarks/results/design_sweep.json]

Runs are resumable (each has its own `output_dir`; a finished one is not trained again) and the JSON is rewritten after
every run, so a long sweep can be stopped and continued. Writes JSON, a markdown table and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Optional

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from report import write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

import peft_metal  # noqa: F401
from peft_metal.base_models import load_base_model
from peft_metal.evaluation import evaluate, load_eval_tasks
from peft_metal.pgm import attach_pgm, load_pgm
from peft_metal.training import MetaTrainer, TrainingArguments

DEV_TASKS = "phrase_relatedness,similarities_abstraction,cause_and_effect/one_sentence,snarks,swahili_english_proverbs,code_line_description"


def mean_score(records: list[dict[str, Any]]) -> float:
    scores = [record["score"] for record in records if "error" not in record]
    return sum(scores) / max(len(scores), 1)


def run_name(design: str, distillation_weight: float, num_prompt_tokens: Optional[int]) -> str:
    name = design if num_prompt_tokens is None else f"{design}-K{num_prompt_tokens}"
    return name if distillation_weight == 0 else f"{name}+distill{distillation_weight:g}"


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    log = output_dir / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def sweep_run(args: argparse.Namespace, design: str, distillation_weight: float, tasks, done: dict[str, Any]) -> dict[str, Any]:
    name = run_name(design, distillation_weight, args.num_prompt_tokens)
    output_dir = args.runs_dir / name
    training_args = TrainingArguments.from_json(
        args.config, output_dir=str(output_dir), prompt_design=design, distillation_weight=distillation_weight,
        num_prompt_tokens=args.num_prompt_tokens, max_steps=args.max_steps, warmup_steps=max(1, args.max_steps // 8),
        eval_every=args.max_steps, checkpoint_every=max(1, args.max_steps // 4), init_from=None,
    )
    record = dict(done.get(name, {}), run=name, design=design, distillation_weight=distillation_weight)
    evaluation = dict(shots=args.shots, queries=args.queries, seed=args.seed, progress=False)
    needs_training = not (output_dir / "pgm" / "adapter_config.json").exists()
    if "untrained" not in record or needs_training:
        trainer = MetaTrainer(training_args)
        if "untrained" not in record:  # the fresh PGM the run starts from (built by the trainer with the run's seed)
            trainer.model.eval()
            record["untrained"] = evaluate(trainer.model, trainer.tokenizer, tasks, ["metal"], **evaluation)
        if needs_training:
            started = time.perf_counter()
            record["summary"] = trainer.train(resume=True)
            record["train_seconds_last_session"] = round(time.perf_counter() - started, 1)
        del trainer
    if "trained" not in record:
        lm, tokenizer = load_base_model(args.model)
        model = attach_pgm(lm, str(output_dir / "pgm")).eval()
        record["trained"] = evaluate(model, tokenizer, tasks, ["metal"], **evaluation)
    dev_losses = [(entry["step"], entry["dev_loss"]) for entry in read_log(output_dir) if "dev_loss" in entry]
    record["dev_loss"] = {"start": dev_losses[0][1], "end": dev_losses[-1][1], "steps": dev_losses[-1][0]}
    record["episodes"] = args.max_steps * training_args.gradient_accumulation_steps
    return record


def plot(path: Path, runs: list[dict[str, Any]], references: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [run["run"] for run in runs]
    positions = range(len(names))
    figure, axis = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    axis.bar([p - 0.2 for p in positions], [mean_score(run["untrained"]) for run in runs], 0.4, label="untrained")
    axis.bar([p + 0.2 for p in positions], [mean_score(run["trained"]) for run in runs], 0.4, label="meta-trained")
    for (label, value), style in zip(references.items(), ("--", ":")):
        axis.axhline(value, color="gray", linestyle=style, label=label)
    axis.set_xticks(list(positions), names, rotation=15)
    axis.set_ylabel("mean dev accuracy (metal)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/configs/train_smollm2_prefix.json")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--designs", default="discrete,weighted_sum,hidden_state,prefix")
    parser.add_argument("--distill", default="discrete", help="designs also run with the distillation term ('' for none)")
    parser.add_argument("--distillation-weight", type=float, default=1.0)
    parser.add_argument("--num-prompt-tokens", type=int, default=None, help="K for every run (default: the config's)")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--tasks", default=DEV_TASKS)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/design_sweep"))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "design_sweep.json")
    args = parser.parse_args()

    tasks = load_eval_tasks(args.tasks)
    report_path = args.output
    previous = json.loads(report_path.read_text()) if report_path.exists() else {}
    done = {run["run"]: run for run in previous.get("runs", []) if run.get("max_steps") == args.max_steps}
    machine = f"{platform.machine()}, {torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU, {torch.get_num_threads()} threads'}"
    plan = [(design, 0.0) for design in args.designs.split(",")]
    plan += [(design, args.distillation_weight) for design in args.distill.split(",") if design]
    report: dict[str, Any] = {"config": args.config, "machine": machine, "tasks": [task.name for task in tasks], "runs": list(done.values())}
    if "references" not in previous:
        model, tokenizer, _ = load_pgm(args.model, warn_untrained=False)  # zero_shot and icl run with LoRA off
        records = evaluate(model, tokenizer, tasks, ["zero_shot", "icl"], args.shots, args.queries, args.seed, progress=False)
        report["references"] = {method: mean_score([r for r in records if r["method"] == method]) for method in ("zero_shot", "icl")}
    else:
        report["references"] = previous["references"]
    for design, weight in plan:
        record = sweep_run(args, design, weight, tasks, done)
        record["max_steps"] = args.max_steps
        record.setdefault("machine", machine)  # where it was measured (a resumed sweep keeps earlier runs' machine)
        run_names = [run["run"] for run in report["runs"]]
        if record["run"] in run_names:  # keep the table's row order across resumed and re-rendered sweeps
            report["runs"][run_names.index(record["run"])] = record
        else:
            report["runs"].append(record)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=1) + "\n")

    runs = report["runs"]
    report["machine"] = "; ".join(dict.fromkeys(run["machine"] for run in runs))
    names = [task.name for task in tasks]
    lines = [
        f"`python experiments/design_sweep.py --config {args.config} --max-steps {args.max_steps}` on {report['machine']}; "
        f"`metal` (no demonstrations) on {len(tasks)} dev tasks, {args.shots} shots, {args.queries} queries, seed {args.seed}. "
        f"References: zero-shot {report['references']['zero_shot']:.3f}, ICL-{args.shots} {report['references']['icl']:.3f}.",
        "",
        "| run | episodes | dev loss start → end | untrained accuracy | meta-trained accuracy | "
        + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for run in runs:
        per_task = {r["task"]: r.get("score") for r in run["trained"]}
        cells = " | ".join(f"{per_task[n]:.3f}" if per_task.get(n) is not None else "error" for n in names)
        lines.append(
            f"| {run['run']} | {run['episodes']} | {run['dev_loss']['start']:.3f} → {run['dev_loss']['end']:.3f} | "
            f"{mean_score(run['untrained']):.3f} | {mean_score(run['trained']):.3f} | {cells} |"
        )
    write_report(report_path.parent, report_path.stem, report, lines)
    plot(report_path.with_suffix(".png"), runs, {"zero-shot": report["references"]["zero_shot"], f"ICL-{args.shots}": report["references"]["icl"]})


if __name__ == "__main__":
    main()
