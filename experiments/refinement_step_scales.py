"""Can refinement learn its own step sizes? Meta-SGD (Li et al. 2017) for a PGM's prefix prompt: one learned scale per
layer, key/value and slot multiplies every Adam step of `refine` (prompt = start + scale * offset, Adam on the offset),
meta-trained on train-family episodes by the first-order hypergradient of the query loss after the refinement, and
compared on dev-family episodes against plain refinement (every scale 1).

    python experiments/refinement_step_scales.py train --pgm pgms/smollm2-compressed-ce-answers --episodes 150 \
        --scales runs/step_scales.safetensors
    python experiments/refinement_step_scales.py compare --pgm pgms/smollm2-compressed-ce-answers \
        --scales runs/step_scales.safetensors --episodes 8 --name refinement_step_scales

Episodes are shaped as the dev panel's `metal+demos+refine@10`: 12 shots the PGM reads and refinement tunes on, 4
kept as demonstrations, 10 Adam steps at 5e-2 on minibatches of 8 (train: 4 queries an episode, task families drawn
evenly; compare: 8 queries), on the split's multiple-choice tasks with short shots (`split_tasks`). `train` logs every episode to `<scales>.jsonl` and saves the scales every 25 episodes;
`compare` writes `<name>.json` and `.md` under benchmarks/results with each dev episode's query loss both ways.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from report import provenance, write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves
from safetensors.torch import load_file, save_file
from torch import nn

from peft_metal.data import EpisodeSampler, load_bigbench_task, tasks_for_split
from peft_metal.data.task import MULTIPLE_CHOICE
from peft_metal.designs import get_design
from peft_metal.metal_prompt.queries import answer_tokens, encode_queries, split_by_tokens
from peft_metal.metal_prompt.reading import forward_with_prompt
from peft_metal.metal_prompt.refine import DEFAULT_BATCH_SIZE, DEFAULT_LR, MAX_BATCH_TOKENS
from peft_metal.pgm import load_pgm
from peft_metal.precision import cast_frozen_weights

STEPS, XP, XL = 10, 12, 4
MIN_EXAMPLES = 20
MAX_MEDIAN_SHOT_CHARS = 400


class Refiner:
    """The frozen LM, its PGM, and refinement of the PGM's prefix prompts with per-(layer, key/value, slot) scales."""

    def __init__(self, pgm: str) -> None:
        model, self.tokenizer, _ = load_pgm("smollm2-135m", pgm=pgm)
        cast_frozen_weights(model, "auto")
        self.tuner = model.base_model.eval()
        self.lm = self.tuner.model
        if self.tuner.metal_config.prompt_design != "prefix":
            raise ValueError(f"{pgm} makes {self.tuner.metal_config.prompt_design} prompts; this probe scales prefix ones.")
        self.design = get_design("prefix")

    def unit_scales(self) -> dict[str, torch.Tensor]:
        layers = self.lm.config.num_hidden_layers
        k = self.tuner.metal_config.num_prompt_tokens
        return {name: torch.zeros(layers, 1, k, 1) for name in ("keys", "values")}  # log scales: 0 is plain refinement

    def loss(self, prompt, pairs) -> torch.Tensor:
        batch = encode_queries(pairs, self.tokenizer, self.tuner.template, self.lm.device)
        total = answer_tokens(batch)
        loss = torch.zeros(())
        for piece in split_by_tokens(batch, MAX_BATCH_TOKENS):
            outputs = forward_with_prompt(self.lm, prompt, piece.input_ids, piece.attention_mask, piece.labels)
            loss = loss + outputs.loss * (answer_tokens(piece) / total)
        return loss

    def query_loss(self, episode, log_scales: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        """The queries' loss after `STEPS` scaled Adam steps on XP, differentiable in `log_scales` (first order: the
        offsets Adam found are held constant)."""
        shots = [example.as_shot() for example in episode.xp + episode.xl]
        with torch.no_grad():
            prompt = self.tuner.generate_prompt(shots, self.tokenizer, num_demonstrations=len(episode.xl))
        start = self.design.tunable_payload(prompt, self.lm)
        base = {name: tensor.detach().float() for name, tensor in start.items()}
        offsets = {name: nn.Parameter(torch.zeros_like(tensor)) for name, tensor in base.items()}
        optimizer = torch.optim.Adam(offsets.values(), lr=DEFAULT_LR)
        fixed = {name: log_scales[name].detach().exp() for name in base}
        order = random.Random(seed)
        xp_pairs = [example.as_shot() for example in episode.xp]

        def with_offsets(scales):
            return replace(prompt, **{n: (base[n] + scales[n] * offsets[n]).to(start[n].dtype) for n in base})

        with torch.enable_grad():
            for _ in range(STEPS):
                optimizer.zero_grad()
                self.loss(with_offsets(fixed), order.sample(xp_pairs, min(DEFAULT_BATCH_SIZE, len(xp_pairs)))).backward()
                optimizer.step()
            for offset in offsets.values():
                offset.requires_grad_(False)
            return self.loss(with_offsets({n: log_scales[n].exp() for n in base}), [e.as_shot() for e in episode.queries])


def split_tasks(split: str) -> list:
    """The split's multiple-choice tasks (what the dev panel scores) with enough examples and short shots: one
    reading-comprehension episode took 18 minutes of the first try's 35."""
    tasks = [load_bigbench_task(name) for name in tasks_for_split(split)]
    return [
        task for task in tasks
        if task.metric == MULTIPLE_CHOICE and len(task.examples) >= MIN_EXAMPLES
        and statistics.median(len(e.input) + len(e.output) for e in task.examples) <= MAX_MEDIAN_SHOT_CHARS
    ]


def train(args: argparse.Namespace) -> None:
    refiner = Refiner(args.pgm)
    log_scales = {name: nn.Parameter(tensor) for name, tensor in refiner.unit_scales().items()}
    optimizer = torch.optim.Adam(log_scales.values(), lr=args.meta_lr)
    sampler = EpisodeSampler(
        split_tasks("train"), xp_range=(XP, XP), xl_range=(XL, XL), num_queries=4, seed=args.seed, task_sampling="family"
    )
    log_path = args.scales.with_suffix(".jsonl")
    args.scales.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log_path.open("w") as log:
        for step in range(args.episodes):
            episode = sampler.episode(step)
            optimizer.zero_grad()
            loss = refiner.query_loss(episode, log_scales, seed=step)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for tensor in log_scales.values():
                    tensor.clamp_(-args.max_log_scale, args.max_log_scale)
            record = {
                "step": step, "task": episode.task_name, "loss": loss.item(), "seconds": time.time() - started,
                "mean_log_scale": {n: t.mean().item() for n, t in log_scales.items()},
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            if (step + 1) % 25 == 0 or step + 1 == args.episodes:
                save_file({n: t.detach().contiguous() for n, t in log_scales.items()}, str(args.scales))


def compare(args: argparse.Namespace) -> None:
    refiner = Refiner(args.pgm)
    learned = load_file(str(args.scales))
    plain = refiner.unit_scales()
    if {n: t.shape for n, t in learned.items()} != {n: t.shape for n, t in plain.items()}:
        raise ValueError(f"{args.scales} holds scales for another PGM shape than {args.pgm}'s.")
    sampler = EpisodeSampler(split_tasks("dev"), xp_range=(XP, XP), xl_range=(XL, XL), num_queries=8, seed=args.seed)
    rows = []
    for index in range(args.episodes):
        episode = sampler.episode(index)
        with torch.no_grad():
            losses = {label: refiner.query_loss(episode, scales, seed=index).item() for label, scales in
                      (("plain", plain), ("learned", learned))}
        rows.append({"episode": index, "task": episode.task_name, **losses})
    mean = {label: sum(row[label] for row in rows) / len(rows) for label in ("plain", "learned")}
    wins = sum(row["learned"] < row["plain"] for row in rows)
    report = {**provenance(), "pgm": args.pgm, "scales": str(args.scales), "mean": mean, "learned_lower": wins,
              "episodes": rows, "scale_summary": {n: {"mean": t.exp().mean().item(), "min": t.exp().min().item(),
                                                      "max": t.exp().max().item()} for n, t in learned.items()}}
    lines = [
        f"Dev query loss after {STEPS} refinement steps, plain against learned step scales ({args.pgm}; "
        f"{len(rows)} dev episodes, seed {args.seed}).", "",
        "| episode | task | plain | learned scales |", "|---|---|---|---|",
        *[f"| {r['episode']} | {r['task']} | {r['plain']:.3f} | {r['learned']:.3f} |" for r in rows],
        f"| **mean** | | **{mean['plain']:.3f}** | **{mean['learned']:.3f}** |",
    ]
    write_report(Path(args.output), args.name, report, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "compare"):
        command = commands.add_parser(name)
        command.add_argument("--pgm", required=True, help="a saved prefix-design PGM folder")
        command.add_argument("--scales", type=Path, required=True, help="the learned log scales (safetensors)")
        command.add_argument("--episodes", type=int, required=True)
    commands.choices["train"].add_argument("--seed", type=int, default=5)
    commands.choices["train"].add_argument("--meta-lr", type=float, default=0.02)
    commands.choices["train"].add_argument("--max-log-scale", type=float, default=2.0)
    commands.choices["compare"].add_argument("--seed", type=int, default=777)
    commands.choices["compare"].add_argument("--name", default="refinement_step_scales")
    commands.choices["compare"].add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    (train if args.command == "train" else compare)(args)


if __name__ == "__main__":
    main()
