"""Eager or SDPA attention for the passes that train, by the size of an episode's largest graded pass.

    python experiments/graded_attention.py [--config experiments/configs/train_smollm2_all_scope_processes2.json] [--draw 300]
        [--episodes 6] [--repeats 2] [--name graded_attention]

The trainer is built as `peft-metal train` builds it; `--draw` episodes of its stream are drawn, and `--episodes` of
them, spread over the sizes of their largest graded pass (`EpisodeLoss.graded_scores`: attention scores per head and
layer, which eager attention keeps for the backward), each run as in training (the loss, then its backward) with the
graded passes in eager attention and in SDPA, alternately, `--repeats` times; the fastest time of each is kept. Then
the largest of them runs once more in a fresh process per implementation, whose peak resident memory over that
episode is read (the kernel's VmHWM, reset just before it).
Writes `<name>.json` and `.md`. This is what `EpisodeLoss.eager_max_scores` is chosen from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
from episode_sources import episode_tasks  # benchmarks/episode_sources.py
from report import (  # benchmarks/report.py: the JSON + markdown every benchmark leaves
    machine_description,
    write_report,
)

import peft_metal  # noqa: F401
from peft_metal.metal_prompt.queries import encode_queries
from peft_metal.training import MetaTrainer, TrainingArguments

IMPLEMENTATIONS = ("eager", "sdpa")


def build(config: str, output_dir: str) -> MetaTrainer:
    settings = TrainingArguments.from_json(config, output_dir=output_dir, init_from=None)
    # The BIG-bench-format train tasks: the long episodes this probe is about (BIG-bench's own mix is gone).
    trainer = MetaTrainer(settings, train_tasks=episode_tasks("tasks", settings), dev_tasks=[])
    trainer.loss_module.eager_max_scores = float("inf")  # each run below names its implementation itself
    return trainer


def sized_episodes(trainer: MetaTrainer, draw: int) -> list[tuple[int, Any]]:
    """`draw` episodes of the trainer's stream that fit its PGM, with their largest graded pass, smallest first."""
    loss, tuner = trainer.loss_module, trainer.model.base_model
    sized = []
    for _ in range(draw):
        episode = trainer.next_episode()
        xp_tokens = len(loss._encode(episode.xp))
        if xp_tokens > trainer.args.max_pgm_tokens:
            continue
        batch = encode_queries([query.as_shot() for query in episode.queries], trainer.tokenizer, tuner.template, "cpu")
        sized.append((loss.graded_scores(xp_tokens, len(loss._encode(episode.xl)), batch), episode))
    return sorted(sized, key=lambda item: item[0])


def run_episode(trainer: MetaTrainer, episode: Any, implementation: str) -> float:
    trainer.loss_module.graded_attention = implementation
    started = time.perf_counter()
    trainer.loss_module(episode)["loss"].backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def peak_memory_worker(args: argparse.Namespace) -> None:
    """Runs the largest drawn episode once with `--peak-memory`'s implementation; prints the peak RSS in GB."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build(args.config, output_dir)
        scores, episode = sized_episodes(trainer, args.draw)[-1]
        before = resident_gb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak (VmHWM) restarts from here
        run_episode(trainer, episode, args.peak_memory)
    print(json.dumps({"scores": scores, "peak_gb": resident_gb("VmHWM"), "before_gb": before}))


def resident_gb(field: str) -> float:
    """This process's resident memory now (`VmRSS`) or at its peak (`VmHWM`), from the kernel, in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/configs/train_smollm2_all_scope_processes2.json")
    parser.add_argument("--draw", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="graded_attention")
    parser.add_argument("--peak-memory", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)  # the worker's mode
    args = parser.parse_args()
    if args.peak_memory:
        peak_memory_worker(args)
        return
    if args.episodes < 2:
        raise SystemExit(f"--episodes {args.episodes}: at least 2, to span the episodes' sizes.")

    rows = []
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build(args.config, output_dir)
        sized = sized_episodes(trainer, args.draw)
        picked = [sized[round(i * (len(sized) - 1) / (args.episodes - 1))] for i in range(args.episodes)]
        run_episode(trainer, picked[0][1], "eager")  # untimed: first-call costs
        for scores, episode in picked:
            seconds = {implementation: [] for implementation in IMPLEMENTATIONS}
            for _ in range(args.repeats):
                for implementation in IMPLEMENTATIONS:
                    seconds[implementation].append(run_episode(trainer, episode, implementation))
            rows.append({"scores": scores, **{f"{name}_seconds": min(times) for name, times in seconds.items()}})
        precision = trainer.precision

    worker = [sys.executable, __file__, "--config", args.config, "--draw", str(args.draw), "--peak-memory"]
    memory = {name: json.loads(subprocess.run(worker + [name], check=True, capture_output=True, text=True).stdout.splitlines()[-1])
              for name in IMPLEMENTATIONS}

    machine = machine_description()
    report = {
        "command": "python experiments/graded_attention.py " + " ".join(sys.argv[1:]), "machine": machine,
        "config": args.config, "precision": precision, "episodes": rows, "largest_episode_peak_memory": memory,
    }
    lines = [
        f"One meta-training episode (loss and backward) of `{args.config}` ({precision}; {machine}), its graded passes in "
        f"eager attention or SDPA, fastest of {args.repeats} alternate runs; episodes spread over the {len(sized)} of "
        f"{args.draw} drawn that fit, by their largest graded pass (attention scores per head and layer).",
        "",
        "| largest graded pass (scores) | eager s | SDPA s | eager / SDPA |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['scores']:,} | {row['eager_seconds']:.2f} | {row['sdpa_seconds']:.2f} | "
                     f"{row['eager_seconds'] / row['sdpa_seconds']:.2f} |")
    lines += ["", f"Peak resident memory of a fresh process running the largest ({memory['eager']['scores']:,} scores): "
              f"eager {memory['eager']['peak_gb']:.1f} GB, SDPA {memory['sdpa']['peak_gb']:.1f} GB "
              f"(resident before the episode: {memory['eager']['before_gb']:.1f} GB; the peak is counted from there)."]
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
