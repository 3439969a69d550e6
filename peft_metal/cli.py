"""The `peft-metal` command: `train`, `eval` and `demo`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _train(args: argparse.Namespace) -> int:
    from .training import MetaTrainer, TrainingArguments

    training_args = TrainingArguments.from_json(args.config, output_dir=args.output_dir, max_steps=args.max_steps)
    summary = MetaTrainer(training_args).train(resume=args.resume)
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-metal", description="MetaL-Prompt: meta-learned prompt generation.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="meta-train a PGM on the train families of BIG-bench")
    train.add_argument("--config", required=True, help="a JSON file of TrainingArguments (see examples/)")
    train.add_argument("--output-dir", help="overrides the config's output_dir")
    train.add_argument("--max-steps", type=int, help="overrides the config's max_steps")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.set_defaults(run=_train)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
