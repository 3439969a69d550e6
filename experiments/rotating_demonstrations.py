"""Refinement with demonstrations drawn afresh each step: `metal+demos+refine` tunes its prompt on the 12 shots the
PGM read, always with the same 4 demonstrations in the context, so those 4 answers are never learnt from and the
prompt is fitted to one set of demonstrations. Here each step draws 4 of all 16 shots as its demonstrations and its
minibatch from the other 12 (`refine(..., demonstration_shots=...)`); the prompt is served, as before, with the last 4.

    python experiments/rotating_demonstrations.py [--pgm pgms/smollm2-compressed-ce-answers] [--seeds 0,1]
        [--refine-steps 10] [--refine-lr 5e-2] [--name rotating_demonstrations]

Runs, on the dev panel (the last 4 shots are the demonstrations every query reads):

* `icl`: all 16 shots as demonstrations (the bar);
* `metal+demos+refine`: the method as it is (the control);
* `rotated`: the same one-pass prompt (PGM over the first 12 shots), refined with rotating demonstrations;
* `rotated, PGM read 16`: the prompt made from all 16 shots, then refined with rotating demonstrations.

Dev panel only; writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import time

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from panel_probe import Probe, probe_parser  # experiments/panel_probe.py: what the probes share
from report import write_records_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

from peft_metal.evaluation.methods import ICL, METAL_DEMOS_REFINE, PreparedMethod, prepare_method
from peft_metal.evaluation.panels import BIGBENCH_PANEL as DEV_PANEL  # BIG-bench probes
from peft_metal.inference import ModelParts, prompt_context
from peft_metal.metal_prompt.refine import refine

NUM_DEMONSTRATIONS = 4


def rotated(parts: ModelParts, tokenizer, pairs, name: str, pgm_reads_all: bool, steps: int, lr: float,
            seed: int) -> PreparedMethod:
    """The prompt from the first 12 shots (or all 16), refined with demonstrations drawn afresh each step, served
    with the last 4 as its demonstrations."""
    split = len(pairs) - NUM_DEMONSTRATIONS
    read, kept = pairs[:split], pairs[split:]
    began = time.perf_counter()
    with torch.no_grad():
        if pgm_reads_all:
            prompt = parts.tuner.with_demonstrations(parts.tuner.generate_prompt(pairs, tokenizer, chunk_size="auto"),
                                                     kept, tokenizer)
        else:
            prompt = parts.tuner.generate_prompt(pairs, tokenizer, num_demonstrations=NUM_DEMONSTRATIONS,
                                                 chunk_size="auto")
        with parts.lora_off():
            prompt = refine(parts.lm, prompt, read, tokenizer, parts.template, steps, lr, seed=seed,
                            demonstration_shots=kept)
    return PreparedMethod(name, prompt_context(parts.lm, prompt), time.perf_counter() - began, prompt.context_length,
                          info={"refine_steps": steps, "refine_lr": lr}, prompt=prompt)


def task_runs(parts: ModelParts, tokenizer, seed: int, shots, steps: int, lr: float) -> list[PreparedMethod]:
    pairs = [example.as_shot() for example in shots]
    with parts.lora_off():
        runs = [prepare_method(ICL, parts, tokenizer, shots),
                prepare_method(METAL_DEMOS_REFINE, parts, tokenizer, shots, NUM_DEMONSTRATIONS, refine_steps=steps,
                               refine_lr=lr, seed=seed)]
    return runs + [rotated(parts, tokenizer, pairs, name, reads_all, steps, lr, seed)
                   for name, reads_all in (("rotated", False), ("rotated, PGM read 16", True))]


def main() -> None:
    args = probe_parser(__doc__, "rotating_demonstrations").parse_args()
    probe = Probe.load(args)
    started = time.perf_counter()
    records = probe.records(args.queries, lambda parts, seed, shots: task_runs(
        parts, probe.tokenizer, seed, shots, args.refine_steps, args.refine_lr))
    caption = (
        f"{probe.panel(args.queries)}: refinement ({args.refine_steps} Adam steps at {args.refine_lr:g}, batches of 8) "
        f"with the last {NUM_DEMONSTRATIONS} shots as fixed demonstrations (`metal+demos+refine`) or with "
        f"{NUM_DEMONSTRATIONS} drawn afresh each step from all {DEV_PANEL.shots} (`rotated`); served with the last "
        f"{NUM_DEMONSTRATIONS}; PGM {probe.source}; {probe.machine(time.perf_counter() - started)}. Prompt s: making "
        "and refining the prompt."
    )
    write_records_report(args.output, args.name, caption, records, precision=probe.precision)


if __name__ == "__main__":
    main()
