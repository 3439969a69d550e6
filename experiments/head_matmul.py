"""The LM head on a slice of the hidden states: why `compat.give_the_head_contiguous_input` exists.

    python experiments/head_matmul.py [--batch 4] [--length 300] [--keep 10] [--repeats 5] [--name head_matmul]

SmolLM2-135M's head (49152 x 576, bf16 as the frozen weights are on this CPU) applied with `F.linear` to the last
`--keep` positions of a [batch, length, 576] hidden state, as transformers' `logits_to_keep` slices it: on the slice
itself, on a row-major copy of it, and on the whole sequence (`--batch 1 --keep 1`: the slice counts as contiguous to
torch, yet is as slow). Median wall time of `--repeats`.
Writes `head_matmul.json` and `.md`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
import torch.nn.functional as F
from report import (  # benchmarks/report.py: the JSON + markdown every benchmark leaves
    machine_description,
    write_report,
)
from timing import median_seconds  # benchmarks/timing.py

VOCAB, HIDDEN = 49152, 576  # SmolLM2-135M



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--keep", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="head_matmul")
    args = parser.parse_args()

    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16)
    hidden = torch.randn(args.batch, args.length, HIDDEN, dtype=torch.bfloat16)
    sliced = hidden[:, -args.keep :, :]
    with torch.no_grad():
        rows = {
            f"last {args.keep} positions, the slice as is (strides {tuple(sliced.stride())})": 1000 * median_seconds(
                lambda: F.linear(sliced, weight), args.repeats
            ),
            f"last {args.keep} positions, a row-major copy": 1000 * median_seconds(
                lambda: F.linear(sliced.clone(memory_format=torch.contiguous_format), weight), args.repeats
            ),
            f"all {args.length} positions": 1000 * median_seconds(lambda: F.linear(hidden, weight), args.repeats),
        }
    machine = machine_description()
    report = {"command": "python experiments/head_matmul.py " + " ".join(sys.argv[1:]), "machine": machine,
              "batch": args.batch, "length": args.length, "keep": args.keep, "median_ms": rows}
    lines = [
        f"LM head ({VOCAB} x {HIDDEN}, bf16) on hidden states of batch {args.batch}, length {args.length} ({machine}); "
        f"median of {args.repeats}.",
        "",
        "| input | ms |",
        "|---|---|",
        *(f"| {name} | {ms:.1f} |" for name, ms in rows.items()),
    ]
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
