"""The `peft-metal` command: `train`, `export`, `card`, `prompt`, `prompt-targets`, `eval`, `serve` and `demo`, each
built and run by its module in `peft_metal/commands/`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .commands import COMMANDS
from .commands.serve import _api_key, _is_loopback  # noqa: F401  (the serve command's key and address checks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-metal", description="MetaL-Prompt: meta-learned prompt generation.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `train --processes N` starts the same command again under accelerate's launcher
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
