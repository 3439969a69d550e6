"""Do a few of the shots' own positions carry the task? The frozen LM reads a task's 16 shots as ICL does; then only
the keys and values at some positions are kept, the rest dropped, and the queries are scored after what is left.

    python experiments/anchor_context.py [--keep all,answers,labels,outputs,last] [--queries 25] [--name anchor_context]

Kept positions (by the shot template's parts, `Input: {x}\\nOutput: {y}\\n\\n`):

* `all`: every position, i.e. ICL-16 itself (the control: it must score as `icl`);
* `answers`: each shot's answer tokens and the separator after it (in ICL the label words gather what a
  demonstration says and the query reads it from them: "Label Words are Anchors", Wang et al., EMNLP 2023);
* `labels`: each shot's first answer token and the separator after it (two or three positions a shot);
* `outputs`: `answers` and each shot's output prefix (`\\nOutput:`);
* `last`: the last positions of the shots, as many as `answers` keeps (a recency window of the same size).

The kept keys keep the rotary positions they were read at, and the queries follow at the position after the last
shot token, so every distance a query sees is the one it has in ICL. No training and no PGM: this asks whether a
context of some 50-190 positions taken from the LM's own reading can hold what 16 shots give ICL, i.e. whether a
prompt that small could. Dev panel only; writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from report import write_records_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

from peft_metal.base_models import load_base_model
from peft_metal.evaluation import load_eval_tasks
from peft_metal.evaluation.methods import PreparedMethod
from peft_metal.evaluation.panels import BIGBENCH_PANEL as DEV_PANEL  # BIG-bench probes
from peft_metal.evaluation.report import merge_seeds
from peft_metal.evaluation.runner import evaluate_prepared, task_metric
from peft_metal.inference import Context, ModelParts
from peft_metal.inference.context import run_lm
from peft_metal.metal_prompt.template import ShotTemplate
from peft_metal.precision import cast_frozen_weights

INPUT, OUTPUT_PREFIX, ANSWER, SEPARATOR = "input", "output prefix", "answer", "separator"


def part_spans(template: ShotTemplate, shots: Sequence[tuple[str, str]]) -> list[tuple[str, int, int]]:
    """(part, first character, end) of every part of `template.format_shots(shots)`, in order."""
    spans, start = [], 0
    for shot_input, shot_output in shots:
        query = template.format_query(shot_input)
        prefix_start = start + len(query) - len(template.output_prefix.rstrip(" "))
        answer_end = start + len(query) + len(template.format_answer(shot_output))
        spans += [
            (INPUT, start, prefix_start),
            (OUTPUT_PREFIX, prefix_start, start + len(query)),
            (ANSWER, start + len(query), answer_end),
            (SEPARATOR, answer_end, answer_end + len(template.shot_separator)),
        ]
        start = answer_end + len(template.shot_separator)
    return spans


def token_parts(tokenizer, template: ShotTemplate, shots) -> tuple[list[int], list[str]]:
    """The shots' token ids, as ICL reads them, and the template part each token ends in."""
    text = template.format_shots(shots)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = part_spans(template, shots)
    parts = []
    for _, end in encoded["offset_mapping"]:
        parts.append(next(part for part, first, last in spans if first < end <= last))
    return encoded["input_ids"], parts


def _answers(parts: list[str]) -> list[int]:
    return [i for i, part in enumerate(parts) if part in (ANSWER, SEPARATOR)]


def _labels(parts: list[str]) -> list[int]:
    first_answer_tokens = [i for i, part in enumerate(parts) if part == ANSWER and (i == 0 or parts[i - 1] != ANSWER)]
    return sorted(first_answer_tokens + [i for i, part in enumerate(parts) if part == SEPARATOR])


SELECTIONS: dict[str, Callable[[list[str]], list[int]]] = {
    "all": lambda parts: list(range(len(parts))),
    "answers": _answers,
    "labels": _labels,
    "outputs": lambda parts: [i for i, part in enumerate(parts) if part in (OUTPUT_PREFIX, ANSWER, SEPARATOR)],
    "last": lambda parts: list(range(len(parts) - len(_answers(parts)), len(parts))),
}


@torch.no_grad()
def kept_context(lm, ids: list[int], keep: list[int]) -> Context:
    """The LM reads all of `ids`, placed so that the position after the last one is len(keep); only the keys and
    values at `keep` are returned, as a context of len(keep) positions that queries continue from."""
    device = next(lm.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    positions = torch.arange(len(keep) - len(ids), len(keep), device=device).unsqueeze(0)
    read = run_lm(lm, input_ids, torch.ones_like(input_ids), positions, None, keep_cache=True, last_only=True)
    index = torch.tensor(keep, device=device)
    layers = [(keys[:, :, index], values[:, :, index]) for keys, values in read.layers]
    return Context(layers=layers, length=len(keep))


def panel_records(lm, tokenizer, tasks, queries: int, selections: list[str]) -> list[dict[str, Any]]:
    parts = ModelParts.from_model(lm)
    records = []
    for seed in DEV_PANEL.seeds:
        for task in tasks:
            shots, task_queries = task.split(DEV_PANEL.shots, queries, seed)
            ids, token_part = token_parts(tokenizer, parts.template, [example.as_shot() for example in shots])
            for selection in selections:
                keep = SELECTIONS[selection](token_part)
                start = time.perf_counter()
                context = kept_context(lm, ids, keep)
                prepared = PreparedMethod(f"kept: {selection}", context, time.perf_counter() - start, len(keep))
                record = evaluate_prepared(parts, tokenizer, task, prepared, task_queries, task_metric(task))
                records.append(dict(record, seed=seed, shot_tokens=len(ids)))
                print(f"seed {seed} {task.name} {selection}: {record['score']:.2f} on {len(keep)} positions", flush=True)
    return merge_seeds(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--keep", default=",".join(SELECTIONS), help=f"comma-separated, of {', '.join(SELECTIONS)}")
    parser.add_argument("--queries", type=int, default=DEV_PANEL.queries)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="anchor_context")
    args = parser.parse_args()
    selections = args.keep.split(",")
    unknown = sorted(set(selections) - set(SELECTIONS))
    if unknown:
        parser.error(f"--keep {unknown}: not a selection; choose from {', '.join(SELECTIONS)}")

    lm, tokenizer = load_base_model(args.model)
    lm.requires_grad_(False).eval()
    precision = cast_frozen_weights(lm, "auto")
    tasks = load_eval_tasks(list(DEV_PANEL.tasks))
    records = panel_records(lm, tokenizer, tasks, args.queries, selections)
    caption = (
        f"The dev panel ({len(tasks)} tasks, {DEV_PANEL.shots} shots, {args.queries} queries x seeds "
        f"{list(DEV_PANEL.seeds)}) scored after the frozen LM's keys/values at some positions of the shots only "
        f"(`kept: all` is ICL-16); {precision} weights ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}). Context tokens: the positions kept."
    )
    write_records_report(args.output, args.name, caption, records, precision=precision)


if __name__ == "__main__":
    main()
