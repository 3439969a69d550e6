"""`peft-metal train`: meta-train a PGM from a JSON config; `--processes N` relaunches itself under accelerate."""

from __future__ import annotations

import argparse
import sys


def add_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="meta-train a PGM on train tasks (MetaICL's pools, BIG-bench-format folders, or both)")
    train.add_argument("--config", required=True, help="a JSON file of TrainingArguments (see examples/)")
    train.add_argument("--output-dir", help="overrides the config's output_dir")
    train.add_argument("--max-steps", type=int, help="overrides the config's max_steps")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument(
        "--init-from", help="start from a saved PGM's weights (continued meta-training; overrides the config's init_from)"
    )
    train.add_argument(
        "--seed", type=int,
        help="overrides the config's seed (the episode stream): a run continued from its last PGM with --init-from "
        "in a new output dir needs a new seed, or it draws the episodes it was trained on again",
    )
    train.add_argument(
        "--processes", type=int, default=1,
        help="data-parallel processes on this machine (accelerate's launcher; on a CPU one thread each, gradients "
        "over gloo; each process draws its own episodes every step, so halve gradient_accumulation_steps to keep the "
        "episodes per step)",
    )
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training import MetaTrainer, TrainingArguments
    from ..training.launch import is_launched

    if args.processes < 1:
        print(f"peft-metal train: error: --processes must be at least 1, got {args.processes}", file=sys.stderr)
        return 2
    if args.processes > 1 and not is_launched():
        return _launch_training(args)
    try:  # the settings and the tasks, checked before anything trains
        training_args = TrainingArguments.from_json(
            args.config, output_dir=args.output_dir, max_steps=args.max_steps, init_from=args.init_from,
            seed=args.seed,
        )
        if training_args.task_dir is None and training_args.metaicl_dir is None and not _has_task_data("train"):
            return 2
        trainer = MetaTrainer(training_args)
    except (ValueError, OSError) as error:
        print(f"peft-metal train: error: {error}", file=sys.stderr)
        return 2
    summary = trainer.train(resume=args.resume)
    print(summary)
    return 0


def _has_task_data(command: str) -> bool:
    """Whether the BIG-bench task files are installed; if not, says so (and how to get them) before a model is loaded."""
    from ..data import bigbench_root

    try:
        bigbench_root()
    except FileNotFoundError as error:
        print(f"peft-metal {command}: error: {error}", file=sys.stderr)
        return False
    return True


def _launch_training(args: argparse.Namespace) -> int:
    """Run this same `train` command, its arguments unchanged, on `args.processes` processes (accelerate's launcher),
    threads split between them; inside the launch `is_launched()` holds, so each process trains."""
    import subprocess

    from ..training.launch import accelerate_command, process_environment

    try:
        command = accelerate_command(["-m", "peft_metal.cli", *args.argv], args.processes)
    except FileNotFoundError as error:
        print(f"peft-metal train: error: {error}", file=sys.stderr)
        return 2
    return subprocess.run(command, env=process_environment(args.processes)).returncode
