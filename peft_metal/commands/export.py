"""`peft-metal export`: a meta-training run's checkpoint as a shippable PGM."""

from __future__ import annotations

import argparse
import sys

from .common import DEV_RESULTS_HELP, labelled_dev_results


def add_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="export a meta-training run's checkpoint as a shippable PGM (padding baked, training facts in "
        "its model card), e.g. to ship what a run that goes on across sessions has so far"
    )
    export.add_argument("--run-dir", required=True, help="the run's output_dir")
    export.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    export.add_argument("--output", required=True, help="folder to write the PGM to")
    export.add_argument("--dev-results", nargs="+", help=DEV_RESULTS_HELP)
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import export_checkpoint

    try:
        target = export_checkpoint(args.run_dir, args.output, args.step, labelled_dev_results(args.dev_results))
    except (ValueError, OSError, KeyError) as error:
        print(f"peft-metal export: error: {error}", file=sys.stderr)
        return 2
    print(f"Exported {args.run_dir} to {target}")
    return 0
