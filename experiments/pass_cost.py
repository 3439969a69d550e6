"""What one pass of the frozen LM costs by how many rows it carries: would several episodes per forward pay?

    python experiments/pass_cost.py [--shapes 1x16,4x16,8x16,1x64,4x8,16x8,1x600] [--repeats 5] [--name pass_cost]

SmolLM2-135M's decoder (frozen weights, bf16 on a CPU with AMX / AVX512-BF16 as `cast_frozen_weights` leaves them)
over inputs of batch x length embeddings, without a cache: forward without gradient, and forward plus backward to the
input (what the PGM's slots and the graded answer positions of an episode take: 16 slots, a few answer tokens per
query). If a pass of 4x16 rows costs about what one of 1x16 does, the small passes are overhead (30 layers of small
ops and weight reads) and batching episodes would pay; if it costs 4x, it would not. Median wall time of `--repeats`.
Writes `<name>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from report import (  # benchmarks/report.py: the JSON + markdown every benchmark leaves
    machine_description,
    write_report,
)
from timing import median_seconds  # benchmarks/timing.py

from peft_metal.base_models import load_base_model
from peft_metal.precision import cast_frozen_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1x16,4x16,8x16,1x64,4x8,16x8,1x600")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="pass_cost")
    args = parser.parse_args()

    lm, _ = load_base_model()
    lm.requires_grad_(False)
    precision = cast_frozen_weights(lm, "auto")
    decoder, dtype = lm.get_decoder(), lm.get_input_embeddings().weight.dtype
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        batch, length = (int(size) for size in shape.split("x"))
        inputs = torch.randn(batch, length, lm.config.hidden_size, dtype=dtype)

        def forward() -> None:
            with torch.no_grad():
                decoder(inputs_embeds=inputs, use_cache=False)

        def forward_backward() -> None:
            graded = inputs.clone().requires_grad_(True)
            decoder(inputs_embeds=graded, use_cache=False).last_hidden_state.float().sum().backward()

        rows.append({"batch": batch, "length": length, "forward_ms": 1000 * median_seconds(forward, args.repeats),
                     "forward_backward_ms": 1000 * median_seconds(forward_backward, args.repeats)})
    machine = machine_description()
    report = {"command": "python experiments/pass_cost.py " + " ".join(sys.argv[1:]), "machine": machine,
              "precision": precision, "rows": rows}
    lines = [
        f"SmolLM2-135M decoder ({precision} frozen weights, {machine}), one pass over batch x length rows, no cache; "
        f"median of {args.repeats}.",
        "",
        "| batch x length | rows | forward, no grad (ms) | forward + backward (ms) |",
        "|---|---|---|---|",
        *(f"| {row['batch']}x{row['length']} | {row['batch'] * row['length']} | {row['forward_ms']:.0f} | "
          f"{row['forward_backward_ms']:.0f} |" for row in rows),
    ]
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
