"""What the dev-panel probes of `metal+demos+refine` share: their common arguments, the model, weights and tasks they
load, the loop over seeds and tasks, how a prepared context is scored, and the machine line of their captions."""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from peft_metal.evaluation import load_eval_tasks
from peft_metal.evaluation.methods import PreparedMethod
from peft_metal.evaluation.panels import BIGBENCH_PANEL as DEV_PANEL  # BIG-bench probes
from peft_metal.evaluation.report import merge_seeds
from peft_metal.evaluation.runner import evaluate_prepared, task_metric
from peft_metal.inference import ModelParts
from peft_metal.pgm import load_pgm
from peft_metal.precision import cast_frozen_weights

DEFAULT_PGM = "pgms/smollm2-compressed-ce-answers"  # the 3,800-episode PGM behind the best metal+demos+refine
RESULTS = Path(__file__).parent / "results"


def probe_parser(doc: str, name: str, pgm: Optional[str] = DEFAULT_PGM, pgm_help: Optional[str] = None,
                 refine_lr_help: Optional[str] = None) -> argparse.ArgumentParser:
    """A parser with the arguments every probe takes; a probe adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pgm", default=pgm, help=pgm_help)
    parser.add_argument("--seeds", default=",".join(map(str, DEV_PANEL.seeds)))
    parser.add_argument("--queries", type=int, default=DEV_PANEL.queries)
    parser.add_argument("--refine-steps", type=int, default=10)
    parser.add_argument("--refine-lr", type=float, default=5e-2, help=refine_lr_help)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--name", default=name)
    return parser


@dataclass
class Probe:
    """The PGM (or the bare LM) with its frozen weights cast, and the dev panel's tasks and seeds."""

    model: Any
    tokenizer: Any
    source: Optional[str]
    precision: str
    tasks: list
    seeds: list[int]

    @classmethod
    def load(cls, args: argparse.Namespace, warn_untrained: bool = True) -> "Probe":
        model, tokenizer, source = load_pgm(args.model, args.pgm, warn_untrained=warn_untrained)
        precision = cast_frozen_weights(model, "auto")
        tasks = load_eval_tasks(list(DEV_PANEL.tasks))
        return cls(model, tokenizer, source, precision, tasks, [int(seed) for seed in args.seeds.split(",")])

    def records(self, queries: int, runs: Callable[[ModelParts, int, list], list[PreparedMethod]]) -> list[dict[str, Any]]:
        """For every seed and task, the methods `runs(parts, seed, shots)` prepares from the draw's shots, scored on
        its queries; with several seeds, each task's records merged over them."""
        parts = ModelParts.from_model(self.model)
        records = []
        for seed in self.seeds:
            for task in self.tasks:
                shots, task_queries = task.split(DEV_PANEL.shots, queries, seed)
                records += [scored(parts, self.tokenizer, task, prepared, task_queries, seed)
                            for prepared in runs(parts, seed, shots)]
        return merge_seeds(records) if len(self.seeds) > 1 else records

    def panel(self, queries: int) -> str:
        return f"The dev panel ({len(self.tasks)} tasks, {DEV_PANEL.shots} shots, {queries} queries x seeds {self.seeds})"

    def machine(self, seconds: float) -> str:
        return (f"{self.precision} weights ({platform.machine()}, {torch.get_num_threads()} threads, torch "
                f"{torch.__version__}; {seconds:.0f} s)")


def scored(parts: ModelParts, tokenizer, task, prepared: PreparedMethod, queries, seed: int) -> dict[str, Any]:
    """`prepared` scored on `queries` with LoRA off, as `peft-metal eval` scores a method, and its line printed.
    Context tokens are averaged over the queries when each read its own demonstrations."""
    with parts.lora_off():
        record = evaluate_prepared(parts, tokenizer, task, prepared, queries, task_metric(task))
    read_tokens = record.pop("_read_tokens", None)
    if read_tokens:
        record["context_tokens"] = sum(read_tokens) / len(read_tokens)
    print(f"seed {seed} {task.name} {prepared.name}: {record['score']:.2f} on {record['context_tokens']:.0f} tokens",
          flush=True)
    return dict(record, seed=seed)
