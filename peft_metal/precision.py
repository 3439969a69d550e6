"""Numeric precision of the frozen LM: bf16 weights where the CPU multiplies bf16 in hardware, fp32 elsewhere.

On CPUs with AMX or AVX512-BF16 a bf16 matrix product is several times faster than an fp32 one, but autocast re-casts
every weight on every call, which costs more than it saves on the short sequences of prompt reading. So the frozen
base weights are kept in bf16 once (`cast_frozen_weights`), while what trains (LoRA, the padding) stays fp32: its
optimizer works on fp32 master weights, and PEFT's LoRA layers cast their input to their own dtype. Buffers (rotary
frequencies) keep their dtype. `benchmarks/train_throughput.py` measures the choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16), read from the kernel's CPU flags."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> Literal["fp32", "bf16"]:
    """`"auto"`: bf16 on a CUDA device with bf16 support or a CPU with AMX / AVX512-BF16, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def cast_frozen_weights(model: nn.Module, precision: str) -> Literal["fp32", "bf16"]:
    """Cast every frozen floating-point parameter to the resolved precision; trainable ones stay fp32.

    Returns the precision used. Casting is in place (one copy of the base weights), and reversible only by reloading,
    so it is done once, right after the model is built.
    """
    device = next(model.parameters()).device
    resolved = resolve_precision(precision, device)
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float32
    for parameter in model.parameters():
        if parameter.is_floating_point():
            target = torch.float32 if parameter.requires_grad else dtype
            if parameter.dtype != target:
                parameter.data = parameter.data.to(target)
    return resolved
