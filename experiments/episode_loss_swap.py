"""Does a PGM's prompt carry what its shots show? Its meta-training loss on episodes, with the prompt made from the
episode's own XP and from the next episode's (another task's, with other labels), the same queries.

    python experiments/episode_loss_swap.py --pgm pgms/smollm2-compressed-ce-answers
        (--tasks a,b,c | --tasks-of experiments/configs/probe_smollm2_symbol_labels.json) [--symbol-labels] [--episodes 60] [--seed 99] [--name episode_loss_swap]

Episodes are drawn as meta-training draws them (`EpisodeSampler`: |XP| 8 to 16, no XL, 4 queries, families equally
likely; with `--symbol-labels` every classification episode's labels renamed to arbitrary words), keeping those whose
shots fit `--max-pgm-tokens`. The loss is `EpisodeLoss`'s (mean cross-entropy of the queries' answers). A prompt that
carries its shots' answers (names of labels, say) scores far better with its own XP than with another episode's.
Writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from report import provenance, write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

import peft_metal  # noqa: F401
from peft_metal.base_models import load_base_model
from peft_metal.data import Episode, EpisodeSampler, load_bigbench_task
from peft_metal.pgm import attach_pgm
from peft_metal.precision import cast_frozen_weights
from peft_metal.training import EpisodeLoss, TrainingArguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pgm", type=Path, action="append", required=True, help="a saved PGM folder (repeatable)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", help="comma-separated train tasks")
    which.add_argument("--tasks-of", type=Path, help="a training config whose `tasks` to draw from")
    parser.add_argument("--symbol-labels", action="store_true", help="rename classification labels to arbitrary words")
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--max-pgm-tokens", type=int, default=1024)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="episode_loss_swap")
    args = parser.parse_args()

    names = args.tasks.split(",") if args.tasks else TrainingArguments.from_json(args.tasks_of).tasks
    if not names:
        parser.error(f"{args.tasks_of} lists no tasks")
    tasks = [load_bigbench_task(name) for name in names]
    sampler = EpisodeSampler(
        tasks, xp_range=(8, 16), xl_range=(0, 0), num_queries=4, seed=args.seed, task_sampling="family",
        symbol_label_rate=1.0 if args.symbol_labels else 0.0,
    )
    rows, precision = [], None
    for pgm in args.pgm:
        lm, tokenizer = load_base_model(args.model)
        model = attach_pgm(lm, str(pgm)).eval()
        precision = cast_frozen_weights(model, "auto")
        loss = EpisodeLoss(model, tokenizer)
        episodes, step = [], 0
        while len(episodes) < args.episodes:
            episode = sampler.episode(step)
            step += 1
            shots = model.base_model.template.format_shots([example.as_shot() for example in episode.xp])
            if len(tokenizer(shots, add_special_tokens=False)["input_ids"]) <= args.max_pgm_tokens:
                episodes.append(episode)
        own, swapped = [], []
        with torch.no_grad():
            for index, episode in enumerate(episodes):
                donor = episodes[(index + 1) % len(episodes)]
                own.append(loss(episode)["lm_loss"].item())
                swapped.append(loss(Episode(episode.task_name, donor.xp, [], episode.queries))["lm_loss"].item())
        gaps = [b - a for a, b in zip(own, swapped)]
        rows.append({
            "pgm": str(pgm), "own": statistics.mean(own), "swapped": statistics.mean(swapped),
            "difference": statistics.mean(gaps), "difference_stderr": statistics.stdev(gaps) / len(gaps) ** 0.5,
        })
        print(rows[-1], flush=True)

    labels = "each classification episode's labels renamed to arbitrary words" if args.symbol_labels else "real labels"
    lines = [
        f"Meta-training loss (mean answer cross-entropy, nats) on {args.episodes} episodes of {len(tasks)} train tasks "
        f"(episode seed {args.seed}, |XP| 8-16, no demonstrations, {labels}), the prompt made from the episode's own XP "
        f"or the next episode's; {precision} frozen weights.",
        "",
        "| PGM | own XP | next episode's XP | difference (± SE) |",
        "|---|---|---|---|",
        *(
            f"| `{r['pgm']}` | {r['own']:.3f} | {r['swapped']:.3f} | {r['difference']:.3f} ± {r['difference_stderr']:.3f} |"
            for r in rows
        ),
    ]
    report = {**provenance(), "tasks": names, "symbol_labels": args.symbol_labels, "rows": rows}
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
