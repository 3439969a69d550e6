"""Does `torch.compile` (inductor) speed up the frozen LM's reads on this CPU? Issue 44's first item.

    python experiments/compiled_read.py [--tokens 128,512] [--repeats 5] [--name compiled_read]

On MetaICL episodes the frozen LM reading without gradient (the shots, then the demonstrations and query tokens after
the prompt) is about 80% of an episode (`benchmarks/episode_profile.py`), so a compiled pass pays only if it speeds
up these reads. Each read is timed as the decoder alone (no head) over `--tokens` random ids, batch 1, in bf16 where
the CPU has bf16 hardware: eager, then compiled with `dynamic=False` (one graph per length, as bucketed lengths
would give). The mean of `--repeats` after one untimed call; the compile time and the largest difference of the
final hidden states are reported. For scale, the same CPU's bf16 matrix product of the decoder's largest shape
(tokens x 576 -> 1536) is timed too: it bounds what any compiler can gain.
Writes `<name>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py)
import torch
from report import machine_description, provenance, write_report

from peft_metal.base_models import load_base_model
from peft_metal.precision import cast_frozen_weights


def mean_seconds(function: Callable[[], object], repeats: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", default="128,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="compiled_read")
    args = parser.parse_args()

    lm, _ = load_base_model(args.model)
    lm.eval().requires_grad_(False)
    precision = cast_frozen_weights(lm, "auto")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    config = lm.config
    flops_per_token = 2 * sum(p.numel() for name, p in lm.model.named_parameters() if p.dim() == 2 and "embed" not in name)
    compiled = torch.compile(lm.model, dynamic=False)
    rows = []
    for length in map(int, args.tokens.split(",")):
        ids = torch.randint(0, config.vocab_size, (1, length))

        def read(model: torch.nn.Module) -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False).last_hidden_state

        eager = mean_seconds(lambda: read(lm.model), args.repeats)
        started = time.perf_counter()
        difference = (read(compiled).float() - read(lm.model).float()).abs().max().item()
        compile_seconds = time.perf_counter() - started
        fast = mean_seconds(lambda: read(compiled), args.repeats)
        x = torch.randn(length, config.hidden_size, dtype=dtype)
        w = torch.randn(config.intermediate_size, config.hidden_size, dtype=dtype)
        matmul = mean_seconds(lambda: torch.nn.functional.linear(x, w), 20)
        rows.append({
            "tokens": length, "eager_s": eager, "compiled_s": fast, "speedup": eager / fast,
            "compile_s": compile_seconds, "max_abs_difference": difference,
            "eager_gflops": flops_per_token * length / eager / 1e9,
            "matmul_gflops": 2 * length * config.hidden_size * config.intermediate_size / matmul / 1e9,
        })
    machine = machine_description()
    lines = [
        f"The frozen decoder reading without gradient, batch 1 ({precision}; {machine}; mean of {args.repeats}):",
        "",
        "| tokens | eager (s) | compiled (s) | speed-up | compile (s) | max abs diff | eager GFLOP/s | matmul GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['tokens']} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | {r['speedup']:.2f}x | {r['compile_s']:.0f} | "
        f"{r['max_abs_difference']:.3g} | {r['eager_gflops']:.0f} | {r['matmul_gflops']:.0f} |"
        for r in rows
    ]
    write_report(args.output, args.name, {**provenance(), "precision": precision, "rows": rows}, lines)


if __name__ == "__main__":
    main()
