"""The shortest 4 shots as demonstrations: `metal+demos` keeps the last 4 shots, about 170 context tokens with a
16-position prompt, while the issue's bar allows a third of ICL-16's tokens (about 207). Keeping the 4 shortest
(in their original order; the PGM reads the other 12 and the prompt is refined on them) leaves room for a prompt of 64
positions within that third, and shows what the choice of the 4 costs with 16.

    python experiments/short_demonstrations.py [--pgm pgms/smollm2-compressed-ce-answers] [--seeds 0,1]
        [--refine-steps 10] [--refine-lr 5e-2] [--no-control] [--name short_demonstrations]

Runs, on the dev panel:

* `icl`: all 16 shots as demonstrations (the bar);
* `metal+demos+refine`: the method as it is, the last 4 shots kept (the control; `--no-control` leaves it out);
* `shortest 4, metal+demos+refine`: the 4 shortest shots kept, the prompt made from and refined on the other 12.

Each record names its context tokens; `within_third` says whether they are at most a third of the task's ICL-16
tokens. Dev panel only; writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
from panel_probe import Probe, probe_parser  # experiments/panel_probe.py: what the probes share
from report import write_records_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

from peft_metal.evaluation.methods import ICL, METAL_DEMOS_REFINE, PreparedMethod, prepare_method
from peft_metal.inference import ModelParts

NUM_DEMONSTRATIONS = 4
BUDGET_SHARE = 3  # the bar: at least 3x fewer context tokens than ICL-16 (`within_third`)


def shortest(lengths: Sequence[int], count: int) -> list[int]:
    """Indices of the `count` shortest shots (the earlier first among equals), in their original order."""
    return sorted(sorted(range(len(lengths)), key=lambda i: lengths[i])[:count])


def task_runs(parts: ModelParts, tokenizer, seed: int, shots, steps: int, lr: float, control: bool) -> list[PreparedMethod]:
    lengths = [len(parts.template.encode_shots([example.as_shot()], tokenizer)) for example in shots]
    kept = shortest(lengths, NUM_DEMONSTRATIONS)
    # the PGM reads the others; the kept shots go last, where prepare_method takes its demonstrations
    reordered = [shot for i, shot in enumerate(shots) if i not in kept] + [shots[i] for i in kept]
    with parts.lora_off():
        runs = [prepare_method(ICL, parts, tokenizer, shots)]
        if control:
            runs.append(prepare_method(METAL_DEMOS_REFINE, parts, tokenizer, shots, NUM_DEMONSTRATIONS,
                                       refine_steps=steps, refine_lr=lr, seed=seed))
        short = prepare_method(METAL_DEMOS_REFINE, parts, tokenizer, reordered, NUM_DEMONSTRATIONS,
                               refine_steps=steps, refine_lr=lr, seed=seed)
    return runs + [replace(short, name=f"shortest {NUM_DEMONSTRATIONS}, {METAL_DEMOS_REFINE}")]


def within_third(records: list[dict]) -> list[dict]:
    """Each record marked with whether its context is within a third of ICL-16's on the same task."""
    icl_tokens = {record["task"]: record["context_tokens"] for record in records if record["method"] == ICL}
    return [dict(record, within_third=record["context_tokens"] * BUDGET_SHARE <= icl_tokens[record["task"]])
            for record in records]


def main() -> None:
    parser = probe_parser(__doc__, "short_demonstrations")
    parser.add_argument("--no-control", action="store_true", help="leave out metal+demos+refine with the last 4")
    args = parser.parse_args()
    probe = Probe.load(args)
    started = time.perf_counter()
    records = within_third(probe.records(args.queries, lambda parts, seed, shots: task_runs(
        parts, probe.tokenizer, seed, shots, args.refine_steps, args.refine_lr, not args.no_control)))
    caption = (
        f"{probe.panel(args.queries)}: `metal+demos+refine` ({args.refine_steps} Adam steps at {args.refine_lr:g}, "
        f"batches of 8) keeping the last {NUM_DEMONSTRATIONS} shots, or the {NUM_DEMONSTRATIONS} shortest "
        f"(`shortest {NUM_DEMONSTRATIONS}`); PGM {probe.source}; {probe.machine(time.perf_counter() - started)}. "
        "Prompt s: making and refining the prompt."
    )
    write_records_report(args.output, args.name, caption, records, precision=probe.precision)


if __name__ == "__main__":
    main()
