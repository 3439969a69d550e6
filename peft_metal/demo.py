"""The main job (`make demo` / `peft-metal demo`): SmolLM2-135M and its PGM on dev tasks, against zero-shot and ICL.

For each dev task the demo makes the prompt from 16 shots, shows it, and scores zero-shot, ICL-16 (all 16 shots as
demonstrations), MetaL-Prompt (the 16 shots read by the PGM, no demonstrations) and MetaL-Prompt as served at its
best on the dev panel (`metal+demos+refine`: 12 shots read by the PGM, the prompt refined 10 steps on them, 4 kept as
demonstrations) on the same seeded queries, with the prompt-creation time and the tokens the LM reads per query
before each query; every method is also scored calibrated from the shots (`--calibration shots` of `peft-metal eval`,
the server's `calibrate`); then one summary line.

The dev tasks are four of MetaICL's dev tasks under MetaICL's protocol (one seed's 16 given demonstrations), found
through `$PEFT_METAL_DATA` (`data.corpora`). Without them it runs on the project's own example tasks instead
(`peft_metal/data/example_tasks`: antonyms, capitals, review sentiment, number parity, written for this demo in
BIG-bench's JSON format), and says so: the main job runs on a fresh machine either way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .data import Task, load_bigbench_tasks
from .data.corpora import corpus_dir
from .data.metaicl import SEEDS as METAICL_SEEDS
from .data.metaicl import load_metaicl_tasks
from .designs import get_design
from .evaluation import evaluate, write_results

DEMO_TASKS = ("emotion", "rotten_tomatoes", "sms_spam", "trec")  # MetaICL dev tasks
EXAMPLE_TASK_DIR = Path(__file__).parent / "data" / "example_tasks"
EXAMPLE_TASKS = ("antonyms", "country_capitals", "review_sentiment", "number_parity")
DEMO_METHODS = ("zero_shot", "icl", "metal", "metal+demos+refine")


def describe_prompt(model: Any, tokenizer: Any, shots: Sequence[tuple[str, str]]) -> str:
    """One line about the prompt the PGM makes from `shots` (its text, for a prompt of vocabulary tokens)."""
    start = time.perf_counter()
    with torch.no_grad():
        prompt = model.generate_prompt(list(shots), tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    shown = get_design(prompt.design).describe(prompt)
    return f"{prompt.design} prompt of K={prompt.num_tokens} from {len(shots)} shots in {seconds * 1000:.0f} ms: {shown}"


def demo_tasks(seed: Optional[int] = None) -> tuple[list[Task], str, int]:
    """MetaICL's dev tasks where `$PEFT_METAL_DATA` has them (seed: MetaICL's first unless given), else the example
    tasks (seed 0 unless given): the tasks, where they came from, and the seed."""
    try:
        root = corpus_dir("metaicl")
    except FileNotFoundError as error:
        print(f"{error}\nThe demo runs on the project's own example tasks instead ({EXAMPLE_TASK_DIR}); they are not "
              "dev tasks, so its figures are not comparable with docs/results.md.")
        return load_bigbench_tasks(EXAMPLE_TASKS, EXAMPLE_TASK_DIR), str(EXAMPLE_TASK_DIR), 0 if seed is None else seed
    seed = METAICL_SEEDS[0] if seed is None else seed
    return load_metaicl_tasks(root, DEMO_TASKS, seeds=(seed,)), str(root), seed


def run_demo(
    model: Any,
    tokenizer: Any,
    pgm_source: str,
    tasks: Sequence[Task],
    task_source: str,
    shots: int = 16,
    queries: int = 24,
    seed: int = 0,
    output: str = "demo_results/results.json",
) -> list[dict[str, Any]]:
    """The demo on `tasks` (read from `task_source`, which the results record)."""
    loaded = list(tasks)
    print(f"PGM: {pgm_source}")
    for task in loaded:
        example_shots, _ = task.split(shots, queries, seed)
        print(f"[{task.name}] {describe_prompt(model, tokenizer, [e.as_shot() for e in example_shots])}")
    results = evaluate(model, tokenizer, loaded, list(DEMO_METHODS), shots, queries, seed, calibration="shots")
    settings = {
        "pgm": pgm_source, "tasks": [task.name for task in loaded], "task_source": task_source, "shots": shots,
        "queries": queries, "seed": seed, "calibration": "shots",
    }
    paths = write_results(results, output, settings=settings)
    print(paths["markdown"].read_text())
    print(f"Wrote {paths['json']}, {paths['markdown']} and {paths['plot']}")
    print(summary_line(results))
    return results


def summary_line(results: Sequence[dict[str, Any]]) -> str:
    """Mean accuracy (and macro-F1, raw and calibrated from the shots, where every task could be calibrated),
    prompt-creation time and context tokens per query, by method, on one line."""
    parts = []
    for method in DEMO_METHODS:
        records = [r for r in results if r.get("method") == method and "error" not in r]
        if not records:
            continue
        score = sum(r["score"] for r in records) / len(records)
        seconds = sum(r["prompt_seconds"] for r in records) / len(records)
        tokens = sum(r["context_tokens"] for r in records) / len(records)
        f1 = ""
        if all("macro_f1_calibrated" in r for r in records):
            raw = sum(r["macro_f1"] for r in records) / len(records)
            calibrated = sum(r["macro_f1_calibrated"] for r in records) / len(records)
            f1 = f", macro-F1 {raw:.3f}, calibrated {calibrated:.3f}"
        parts.append(f"{method} {score:.3f}{f1} ({tokens:.0f} ctx tokens/query, {seconds:.2f} s prompt)")
    return "SUMMARY: " + "; ".join(parts)
