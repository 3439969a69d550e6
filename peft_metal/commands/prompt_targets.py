"""`peft-metal prompt-targets`: one refined prompt per train task, as regression targets for meta-training."""

from __future__ import annotations

import argparse
import sys

from .common import load_pgm_for


def add_parser(commands: argparse._SubParsersAction) -> None:
    targets = commands.add_parser(
        "prompt-targets", help="refine a PGM's prompt for each train task once, as regression targets for meta-training "
        "(TrainingArguments.prompt_targets); a killed run continues where it stopped"
    )
    targets.add_argument("--pgm", required=True, help="the saved PGM whose prompts are refined (the run's init_from)")
    targets.add_argument("--output", required=True, help="folder of targets, one safetensors prompt per task")
    targets.add_argument("--tasks", help="comma-separated train tasks (default: every task of the train split)")
    targets.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or a transformers model id or folder")
    targets.add_argument("--shots", type=int, default=16, help="shots per task, drawn once (default 16)")
    targets.add_argument("--steps", type=int, default=20, help="refinement steps (default 20)")
    targets.add_argument("--lr", type=float, default=1e-2, help="refinement's Adam learning rate (default 1e-2)")
    targets.add_argument("--batch-size", type=int, default=8, help="shots per refinement step (default 8)")
    targets.add_argument("--seed", type=int, default=0, help="seed of the shot draw and the refinement (default 0)")
    targets.add_argument("--device", help="e.g. cuda or cpu (default: cuda if available)")
    targets.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    targets.add_argument("--no-progress", action="store_true")
    targets.set_defaults(run=run, methods="metal")


def run(args: argparse.Namespace) -> int:
    from ..precision import cast_frozen_weights
    from ..training.prompt_targets import TargetSettings, make_prompt_targets
    from ..training.trainer import load_split_tasks

    try:
        settings = TargetSettings(args.pgm, args.shots, args.steps, args.lr, args.batch_size, args.seed)
        tasks = load_split_tasks("train", args.tasks.split(",") if args.tasks else None)
    except (ValueError, FileNotFoundError) as error:
        print(f"peft-metal prompt-targets: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer, _ = load_pgm_for(args)
    cast_frozen_weights(model, args.precision)
    try:
        written = make_prompt_targets(model.base_model, tokenizer, tasks, args.output, settings, progress=not args.no_progress)
    except ValueError as error:
        print(f"peft-metal prompt-targets: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {len(written)} prompt targets to {args.output} ({len(tasks) - len(written)} were there already)")
    return 0
