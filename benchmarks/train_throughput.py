"""Meta-training throughput: episodes per second of several training configs, measured in one run on one machine.

    python benchmarks/train_throughput.py [--configs experiments/configs/train_smollm2_discrete.json,experiments/configs/train_smollm2_compressed.json]
        [--steps 6] [--warmup-steps 1] [--episodes metaicl|tasks|config] [--variants ...] [--output benchmarks/results]

Each config is meta-trained as `peft-metal train` would (same episodes, same loss, optimizer steps included) for
`--warmup-steps` untimed optimizer steps and then `--steps` timed ones, on the train families; no dev evaluation and no
checkpoints inside the timed part. `--variants` adds runs of the same config with one setting changed
(`name:key=value,key=value`), which is how each choice (precision, scope, distillation) is measured on its own;
`processes=N` runs that variant on N data-parallel processes (`accelerate launch`), this process's threads split
between them, and counts the episodes of all of them.
Writes `train_throughput.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from episode_sources import EPISODE_SOURCES, episode_tasks
from report import (  # benchmarks/report.py: the JSON + markdown every benchmark leaves
    machine_description,
    write_report,
)

import peft_metal  # noqa: F401
from peft_metal.training import MetaTrainer, TrainingArguments
from peft_metal.training.launch import accelerate_command, process_environment

DEFAULT_CONFIGS = "experiments/configs/train_smollm2_discrete.json,experiments/configs/train_smollm2_compressed.json"


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """`name:config=path,key=value,...` -> (name, config path, overrides); values are JSON (or plain strings)."""
    name, _, settings = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, re.split(r",(?=\w+=)", settings)):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    config = overrides.pop("config", None)
    if not name or config is None:
        raise SystemExit(f"--variants entry {text!r} must look like name:config=path,key=value")
    return name, config, overrides


def measure(name: str, config: str, overrides: dict[str, Any], episodes_from: str, steps: int, warmup_steps: int) -> dict[str, Any]:
    overrides = dict(overrides)
    processes = overrides.pop("processes", 1)
    if processes > 1:
        return measure_in_processes(name, config, overrides, processes, episodes_from, steps, warmup_steps)
    with tempfile.TemporaryDirectory() as output_dir:
        # Task episodes only (a config's generic-text stage would fill the few timed steps with text episodes).
        args = TrainingArguments.from_json(config, output_dir=output_dir, init_from=None, **{"text_stage_steps": 0, **overrides})
        train_tasks = episode_tasks(episodes_from, args)
        args.max_steps = warmup_steps + steps + 1  # the schedule must not end inside the timed steps
        args.checkpoint_every = args.eval_every = args.max_steps + 1  # nothing but training is timed
        trainer = MetaTrainer(args, train_tasks=train_tasks, dev_tasks=[])
        trainer.train(stop_after=warmup_steps)
        graded_pass = trainer.accelerator.unwrap_model(trainer.loss_module).graded_pass
        shapes_before = len(graded_pass.shapes) if graded_pass is not None else None
        started = time.perf_counter()
        summary = trainer.train(stop_after=steps)
        seconds = time.perf_counter() - started
    processes = trainer.accelerator.num_processes
    episodes = steps * args.gradient_accumulation_steps * processes
    return {
        "run": name,
        "config": config,
        "overrides": overrides,
        "processes": processes,
        "threads_per_process": torch.get_num_threads(),
        "episodes_from": episodes_from,
        "design": args.prompt_design,
        "lora_scope": getattr(args, "lora_scope", "all"),  # runs of code from before lora_scope
        "precision": getattr(trainer, "precision", "fp32"),  # likewise: it trained in fp32 on a CPU
        "distillation_weight": args.distillation_weight,
        "num_prompt_tokens": args.num_prompt_tokens,
        "num_queries": args.num_queries,
        "xp_range": list(args.xp_range),
        "xl_range": list(args.xl_range),
        "episodes": episodes,
        "seconds": round(seconds, 2),
        "episodes_per_s": round(episodes / seconds, 4),
        "seconds_per_1000_episodes": round(1000 * seconds / episodes, 1),
        "final_train_loss": summary["final_train_loss"],
        # With compile_graded_pass: bucketed shapes (graphs) compiled in the warm-up, and new ones in the timed steps
        # (each compile is timed with them).
        "graded_pass_shapes_warmup": shapes_before,
        "graded_pass_shapes_timed": len(graded_pass.shapes) - shapes_before if graded_pass is not None else None,
    }


def measure_in_processes(
    name: str, config: str, overrides: dict[str, Any], processes: int, episodes_from: str, steps: int, warmup_steps: int
) -> dict[str, Any]:
    """The same measurement on `processes` data-parallel processes (`accelerate launch`, gradients shared over gloo as
    `peft-metal train` shares them), this process's threads split between them; episodes are counted on all of them."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = accelerate_command(
            [__file__, "--worker", str(result), "--steps", str(steps), "--warmup-steps", str(warmup_steps),
             "--episodes", episodes_from,
             "--variants", f"{name}:{json.dumps({'config': config, **overrides})}"],
            processes,
        )
        subprocess.run(command, check=True, env=process_environment(processes))
        return json.loads(result.read_text())


def worker(result: Path, variant: str, episodes_from: str, steps: int, warmup_steps: int) -> None:
    """One of `measure_in_processes`'s processes: measure, and the main one writes the result."""
    name, _, settings = variant.partition(":")
    overrides = json.loads(settings)
    config = overrides.pop("config")
    measured = measure(name, config, overrides, episodes_from, steps, warmup_steps)
    if int(os.environ.get("RANK", "0")) == 0:
        result.write_text(json.dumps(measured))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--variants", nargs="*", default=[], help="name:config=path,key=value,... (extra runs)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--episodes", choices=EPISODE_SOURCES, default="metaicl", help="the train tasks episodes come from (benchmarks/episode_sources.py)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="train_throughput")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # set by measure_in_processes
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.variants[0], args.episodes, args.steps, args.warmup_steps)

    runs = [(Path(config).stem, config, {}) for config in args.configs.split(",") if config]
    runs += [parse_variant(text) for text in args.variants]
    results = []
    for name, config, overrides in runs:
        print(f"measuring {name} ...", flush=True)
        results.append(measure(name, config, overrides, args.episodes, args.steps, args.warmup_steps))
    baseline = results[0]["episodes_per_s"]
    for result in results:
        result["speedup_vs_first"] = round(result["episodes_per_s"] / baseline, 2)

    machine = machine_description()
    report = {"command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
              "machine": machine, "steps": args.steps, "warmup_steps": args.warmup_steps, "runs": results}
    lines = [
        f"Meta-training throughput ({machine}; {args.steps} timed optimizer steps per run after {args.warmup_steps} "
        "untimed; same episode stream for every run of a config; "
        f"episodes from {args.episodes!r}).",
        "",
        "| run | design | scope | precision | distill | K | queries | processes x threads | episodes/s | s / 1,000 episodes | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['run']} | {r['design']} | {r['lora_scope']} | {r['precision']} | {r['distillation_weight']:g} | "
            f"{r['num_prompt_tokens']} | {r['num_queries']} | {r['processes']} x {r['threads_per_process']} | "
            f"{r['episodes_per_s']:.3f} | "
            f"{r['seconds_per_1000_episodes']:,.0f} | {r['speedup_vs_first']:.2f}x |"
        )
    for r in results:
        if r.get("graded_pass_shapes_warmup") is not None:
            lines.append(
                f"\n{r['run']}: the compiled graded pass met {r['graded_pass_shapes_warmup']} bucketed shapes in the "
                f"warm-up and {r['graded_pass_shapes_timed']} new ones in the timed steps (each compiled when first met, "
                "inside the time it was met in)."
            )
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
