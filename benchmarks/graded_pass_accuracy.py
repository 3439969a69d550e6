"""Does the compiled graded pass move the loss? Issue 44's accuracy bar: the dev loss on fixed episodes within 1% of the
eager fp32 path.

    python benchmarks/graded_pass_accuracy.py [--config examples/train_shipped_pgm/train_smollm2_shipped.json]
        [--pgm peft_metal/shipped/smollm2-135m] [--episodes 32] [--name graded_pass_accuracy]

The trainer's own dev loss (the query loss over `--episodes` fixed episodes of MetaICL's dev tasks, the same episodes
for every path, prompts made as at serving) of one saved PGM, under three paths: the frozen LM in fp32 with
transformers' forward, in bf16 with it, and in bf16 with the compiled graded pass (`compile_graded_pass`). The
compiled path is timed twice over the same episodes: the first pass includes compiling its buckets, the second not.
Writes `<name>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from report import machine_description, provenance, write_report

from peft_metal.data.corpora import corpus_dir
from peft_metal.training import MetaTrainer, TrainingArguments
from peft_metal.training.trainer import dev_tasks_of

PATHS = {
    "eager fp32": {"mixed_precision": "fp32"},
    "eager bf16": {"mixed_precision": "bf16"},
    "compiled bf16": {"mixed_precision": "bf16", "compile_graded_pass": True},
}


def timed_dev_loss(trainer: MetaTrainer) -> tuple[float, float]:
    started = time.perf_counter()
    loss = trainer.evaluate()
    return loss, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/train_shipped_pgm/train_smollm2_shipped.json")
    parser.add_argument("--pgm", default="peft_metal/shipped/smollm2-135m")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="graded_pass_accuracy")
    args = parser.parse_args()

    rows = []
    for path, settings in PATHS.items():
        print(f"measuring {path} ...", flush=True)
        training = TrainingArguments.from_json(
            args.config, output_dir="runs/graded-pass-accuracy", init_from=args.pgm, metaicl_dir=str(corpus_dir("metaicl")),
            eval_episodes=args.episodes, text_stage_steps=0, gradient_from_answers_only=True, **settings,
        )
        dev = dev_tasks_of(training)
        trainer = MetaTrainer(training, train_tasks=dev, dev_tasks=dev)  # nothing trains: the dev tasks feed the loss
        loss, seconds = timed_dev_loss(trainer)
        row = {"path": path, "dev_loss": loss, "seconds": seconds, "episodes": len(trainer.dev_episodes)}
        graded_pass = trainer.accelerator.unwrap_model(trainer.loss_module).graded_pass
        if graded_pass is not None:
            row["compiled"] = graded_pass.compiled
            row["second_pass_loss"], row["second_pass_seconds"] = timed_dev_loss(trainer)
        rows.append(row)
    reference = rows[0]["dev_loss"]
    for row in rows:
        row["relative_difference"] = (row["dev_loss"] - reference) / reference

    machine = machine_description()
    lines = [
        f"Dev loss of `{args.pgm}` over {rows[0]['episodes']} fixed MetaICL dev episodes, by path ({machine}):",
        "",
        "| path | dev loss | vs eager fp32 | seconds (first pass) | seconds (second pass) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        second = f"{row['second_pass_seconds']:.1f}" if "second_pass_seconds" in row else ""
        lines.append(
            f"| {row['path']} | {row['dev_loss']:.4f} | {100 * row['relative_difference']:+.2f}% | {row['seconds']:.1f} | {second} |"
        )
    write_report(args.output, args.name, {**provenance(), "rows": rows}, lines)


if __name__ == "__main__":
    main()
