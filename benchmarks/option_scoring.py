"""How much can batching gain on this machine, before any HTTP? The serving engine's option scoring, in-process.

    python benchmarks/option_scoring.py [--model smollm2-135m] [--pgm DIR] [--task NAME] [--batches 1,4,8,16]
                                        [--repeats 5] [--output DIR]

Makes one prompt from 16 shots of a dev task, then times `score_options` (what the server runs per batch) for
B queries with their own options, after the stored prompt's context and after nothing (zero-shot), and reports
queries per second at each B and its ratio to B = 1. For scale it also times a large fp32 matrix multiply: when one
query already runs the model near that rate, batching has little left to gain. Writes `option_scoring.json` and
`option_scoring.md` into DIR (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from report import write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

from peft_metal.data import load_bigbench_task
from peft_metal.inference import ModelParts, empty_context, prompt_context, score_options
from peft_metal.pgm import load_pgm


def matmul_gflops(repeats: int = 50) -> float:
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 1024 * 576 * 1536 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pgm", help="a saved PGM (default: the shipped one)")
    parser.add_argument("--task", default="similarities_abstraction", help="a dev multiple-choice task")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    model, tokenizer, source = load_pgm(args.model, args.pgm)
    parts = ModelParts.from_model(model)
    examples = [e for e in load_bigbench_task(args.task).examples if e.options]
    shots, pool = examples[:16], examples[16:]
    if len(pool) < max(batches):
        raise SystemExit(f"{args.task} has {len(pool)} multiple-choice examples after the shots; need {max(batches)}.")
    prompt = model.generate_prompt([e.as_shot() for e in shots], tokenizer)
    template = parts.template
    queries = [tokenizer.encode(template.format_query(e.input), add_special_tokens=False) for e in pool]
    options = [[tokenizer.encode(template.format_answer(o), add_special_tokens=False) for o in e.options] for e in pool]
    pad_id = tokenizer.pad_token_id or 0
    contexts = {"metal": prompt_context(parts.lm, prompt), "zero_shot": empty_context()}

    rows = []
    with parts.lora_off(), torch.no_grad():
        for name, context in contexts.items():
            for batch in batches:
                score_options(parts.lm, context, queries[:batch], options[:batch], pad_id)  # warm-up
                seconds = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    score_options(parts.lm, context, queries[:batch], options[:batch], pad_id)
                    seconds.append(time.perf_counter() - start)
                rows.append({"context": name, "batch": batch, "seconds": statistics.median(seconds), "queries_per_s": batch / statistics.median(seconds)})
    for row in rows:
        alone = next(r for r in rows if r["context"] == row["context"] and r["batch"] == 1)
        row["vs_batch_1"] = row["queries_per_s"] / alone["queries_per_s"]

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    command = "python benchmarks/option_scoring.py" + (f" --pgm {args.pgm}" if args.pgm else "") + f" --task {args.task}"
    report = {
        "command": command, "machine": machine, "pgm": source, "task": args.task, "prompt_design": prompt.design,
        "matmul_gflops": matmul_gflops(), "rows": rows,
    }
    lines = [
        f"`{command}` on {machine}; a {prompt.design} prompt from 16 shots, each query with its own options; "
        f"median of {args.repeats}. Reference: a 1024x576 by 576x1536 fp32 matmul runs at {report['matmul_gflops']:.0f} GFLOP/s.",
        "",
        "| context | batch | seconds per batch | queries/s | vs batch 1 |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['context']} | {r['batch']} | {r['seconds']:.3f} | {r['queries_per_s']:.2f} | {r['vs_batch_1']:.2f}x |" for r in rows]
    write_report(args.output, "option_scoring", report, lines)


if __name__ == "__main__":
    main()
