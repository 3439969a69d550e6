"""`peft-metal card`: dev results into a saved PGM's config and model card."""

from __future__ import annotations

import argparse
import sys

from .common import DEV_RESULTS_HELP, labelled_dev_results


def add_parser(commands: argparse._SubParsersAction) -> None:
    card = commands.add_parser(
        "card", help="put dev results into a saved PGM's config and model card (e.g. after evaluating it on more draws)"
    )
    card.add_argument("--pgm", required=True, help="the saved PGM's folder")
    card.add_argument("--dev-results", nargs="+", required=True, help=DEV_RESULTS_HELP)
    card.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..pgm import record_dev_results

    try:
        dev_results = labelled_dev_results(args.dev_results)
        if dev_results is None:
            raise ValueError(f"{', '.join(args.dev_results)} hold no results of the PGM's methods (metal...) to record.")
        record_dev_results(args.pgm, dev_results)
    except (ValueError, OSError) as error:
        print(f"peft-metal card: error: {error}", file=sys.stderr)
        return 2
    print(f"Dev results written into {args.pgm}/adapter_config.json and its README.md")
    return 0
