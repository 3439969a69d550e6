"""How much one prompt costs to make, against one plain LM forward over the same shots, and how big the PGM is.

    python benchmarks/prompt_overhead.py [--model smollm2-135m] [--shots 16] [--repeats 5] [--output DIR]

Writes `prompt_overhead.json` and `prompt_overhead.md` into DIR (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from peft import get_peft_model
from report import write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves
from timing import median_seconds  # benchmarks/timing.py

import peft_metal  # noqa: F401
from peft_metal import MetaLPromptConfig
from peft_metal.base_models import load_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    lm, tokenizer = load_base_model(args.model)
    shots = [(f"Review {i}: {'a fine, moving film' if i % 2 else 'a dull and empty film'}.", "positive" if i % 2 else "negative") for i in range(args.shots)]
    rows = []
    for design in ("discrete", "weighted_sum", "hidden_state", "prefix"):
        model = get_peft_model(lm, MetaLPromptConfig(task_type="CAUSAL_LM", prompt_design=design, num_prompt_tokens=16)).eval()
        template = model.base_model.template
        shot_ids = tokenizer(template.format_shots(shots), add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            prompt_s = median_seconds(lambda: model.generate_prompt(shots, tokenizer=tokenizer), args.repeats)
            forward_s = median_seconds(lambda: lm(input_ids=shot_ids), args.repeats)
        trainable, total = model.get_nb_trainable_parameters()
        rows.append(
            {
                "design": design,
                "shot_tokens": int(shot_ids.shape[1]),
                "generate_prompt_s": prompt_s,
                "plain_forward_s": forward_s,
                "ratio": prompt_s / forward_s,
                "trainable_params": trainable,
                "total_params": total,
            }
        )
        lm = model.base_model.remove_pgm()
    machine = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    report = {"model": args.model, "shots": args.shots, "repeats": args.repeats, "machine": machine, "rows": rows}
    lines = [
        f"`python benchmarks/prompt_overhead.py --model {args.model} --shots {args.shots}` on {machine}",
        "",
        "| design | shot tokens | generate_prompt (ms) | plain LM forward (ms) | ratio | trainable / total params |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['design']} | {row['shot_tokens']} | {row['generate_prompt_s'] * 1000:.1f} | "
            f"{row['plain_forward_s'] * 1000:.1f} | {row['ratio']:.2f} | {row['trainable_params']:,} / "
            f"{row['total_params']:,} ({100 * row['trainable_params'] / row['total_params']:.2f}%) |"
        )
    write_report(args.output, "prompt_overhead", report, lines)


if __name__ == "__main__":
    main()
