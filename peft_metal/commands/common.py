"""What several `peft-metal` subcommands share: loading the PGM a command names, and the dev results that go into
a PGM's card."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

DEV_RESULTS_HELP = (
    "results.json files of `peft-metal eval` (one per draw of the panel) whose means go into the model card, each "
    "labelled with its panel and seeds"
)


def labelled_dev_results(paths: Optional[Sequence[str]]) -> Optional[dict[str, float]]:
    """The labelled means of the PGM's own methods (`metal...`; references such as ICL belong to the docs, not to the
    PGM's card) in every results.json given (one per draw of the panel)."""
    from ..evaluation.report import labelled_means

    means = {label: mean for path in paths or () for label, mean in labelled_means(path).items()}
    return {label: mean for label, mean in means.items() if label.startswith("metal")} or None


def load_pgm_for(args: argparse.Namespace, seed: Optional[int] = None):
    """The model, tokenizer and PGM source the command names (`--model`, `--pgm`, `--device`, `--seed`); warns of an
    untrained PGM only when a method reads it."""
    from ..pgm import load_pgm

    methods = getattr(args, "methods", "metal")
    warn = any(method.strip().startswith("metal") for method in methods.split(","))
    return load_pgm(args.model, args.pgm, args.device, args.seed if seed is None else seed, warn_untrained=warn)
