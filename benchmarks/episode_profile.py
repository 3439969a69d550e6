"""Where one meta-training episode's time goes: the parts of `EpisodeLoss` timed apart, on real train-family episodes.

    python benchmarks/episode_profile.py [--config experiments/configs/train_smollm2_compressed_ce.json] [--episodes 16]
        [--warmup 2] [--episodes-from metaicl|tasks|config] [--attn-implementation sdpa] [--name episode_profile]

The trainer is built as `peft-metal train` builds it (precision, attention, the PGM); then each episode runs as in
training (the loss, then its backward) with timers around the parts, which run one after another on the CPU: the
frozen LM reading the shots without gradient (`read_shots`), the PGM making the prompt at its slots
(`generate_prompt_from_read_shots`, forward with gradient), the LM reading the prompt, demonstrations and queries
(the model's forward with gradient), and the backward through both. Everything else (tokenizing, sampling) is
"other". Reports seconds per episode for each part, its share, and the episodes' token counts. Writes
`<name>.json` and `.md`. Compressed-context (`lora_scope="padding"`) configs only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from episode_sources import EPISODE_SOURCES, episode_tasks
from report import (  # benchmarks/report.py: the JSON + markdown every benchmark leaves
    machine_description,
    write_report,
)

import peft_metal  # noqa: F401
from peft_metal.metal_prompt.queries import encode_queries
from peft_metal.training import MetaTrainer, TrainingArguments

PARTS = ("read shots (no grad)", "PGM at the slots (forward)", "LM over prompt, demos, queries (forward)", "backward")


def timed(totals: dict[str, float], part: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[part] += time.perf_counter() - started

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/configs/train_smollm2_compressed_ce.json")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--episodes-from", choices=EPISODE_SOURCES, default="metaicl", help="the train tasks episodes come from (benchmarks/episode_sources.py)")
    parser.add_argument("--attn-implementation", help="overrides the config's (auto: SDPA reads, eager graded passes)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="episode_profile")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as output_dir:
        settings = TrainingArguments.from_json(
            args.config, output_dir=output_dir, init_from=None, attn_implementation=args.attn_implementation,
            text_stage_steps=0,  # task episodes only: the generic-text stage is a different shape of episode
        )
        if settings.lora_scope != "padding":
            raise SystemExit(f"{args.config} has lora_scope {settings.lora_scope!r}; this profile times the 'padding' scope.")
        trainer = MetaTrainer(settings, train_tasks=episode_tasks(args.episodes_from, settings), dev_tasks=[])
        tuner, model, loss_module = trainer.model.base_model, trainer.model, trainer.loss_module
        totals: dict[str, float] = defaultdict(float)
        tuner.read_shots = timed(totals, PARTS[0], tuner.read_shots)
        tuner.generate_prompt_from_read_shots = timed(totals, PARTS[1], tuner.generate_prompt_from_read_shots)
        model.forward = timed(totals, PARTS[2], model.forward)
        rows, tokens = [], []
        for index in range(args.warmup + args.episodes):
            episode = trainer.next_episode()
            totals.clear()
            started = time.perf_counter()
            losses = loss_module(episode)
            timed(totals, PARTS[3], losses["loss"].backward)()
            trainer.optimizer.zero_grad(set_to_none=True)
            total = time.perf_counter() - started
            if index >= args.warmup:
                rows.append({**{part: totals[part] for part in PARTS}, "total": total})
                batch = encode_queries(
                    [query.as_shot() for query in episode.queries], trainer.tokenizer, tuner.template, "cpu"
                )
                tokens.append({
                    "shot_tokens": len(loss_module._encode(episode.xp)),
                    "demonstration_tokens": len(loss_module._encode(episode.xl)),
                    "queries": len(episode.queries),
                    "query_tokens": int(batch.attention_mask.sum()),
                    "query_batch_tokens": batch.attention_mask.numel(),  # with the left padding to the longest
                })

    mean_total = statistics.fmean(row["total"] for row in rows)
    parts = {part: statistics.fmean(row[part] for row in rows) for part in PARTS}
    parts["other"] = mean_total - sum(parts.values())
    machine = machine_description()
    report = {
        "command": "python benchmarks/episode_profile.py " + " ".join(sys.argv[1:]), "machine": machine,
        "config": args.config, "episodes_from": args.episodes_from, "precision": trainer.precision, "episodes": len(rows), "seconds_per_episode": mean_total,
        "parts": parts, "episodes_detail": [{**row, **count} for row, count in zip(rows, tokens)],
    }
    mean_tokens = {key: statistics.fmean(count[key] for count in tokens) for key in tokens[0]}
    lines = [
        f"One meta-training episode, `{args.config}` ({trainer.precision}, attention "
        f"{settings.attn_implementation}; {machine}): {len(rows)} episodes from {args.episodes_from!r} after "
        f"{args.warmup} untimed, {mean_total:.2f} s each on average; per episode {mean_tokens['shot_tokens']:.0f} shot "
        f"tokens, {mean_tokens['demonstration_tokens']:.0f} demonstration tokens, {mean_tokens['queries']:.0f} queries of "
        f"{mean_tokens['query_tokens']:.0f} tokens in all, {mean_tokens['query_batch_tokens']:.0f} with the batch's padding.",
        "",
        "| part | s / episode | share |",
        "|---|---|---|",
    ]
    for part, seconds in parts.items():
        lines.append(f"| {part} | {seconds:.3f} | {100 * seconds / mean_total:.0f}% |")
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
