"""Starting meta-training on several data-parallel processes of one machine, as `accelerate launch` starts them.

On this project's CPU one training process uses its second thread poorly; two processes of one thread each, sharing
gradients over gloo, read more episodes per second (docs/results.md). `peft-metal train --processes N` and the
benchmarks and tests that need several processes build their command here, so there is one way to start them.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Sequence

import torch

# Set by accelerate / torchrun in every process it starts.
LAUNCHED_MARKER = "LOCAL_RANK"


def is_launched() -> bool:
    """True inside a process that `accelerate launch` (torchrun) started."""
    return LAUNCHED_MARKER in os.environ


def free_port() -> int:
    """A TCP port free on the loopback address now, for the processes' rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_command(target: Sequence[str], processes: int) -> list[str]:
    """The `accelerate launch` command that runs `target` (a script and its arguments, or `-m module ...`) on
    `processes` processes of this machine: with GPUs one per GPU, without them on the CPU over gloo.

    `--multi_gpu` is accelerate's name for torchrun's launcher; `--cpu` would start several processes only through
    MPI's mpirun."""
    if processes < 2:
        raise ValueError(f"processes must be at least 2 to launch several processes, got {processes}")
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        raise FileNotFoundError(
            f"{accelerate} not found: several processes are started with accelerate's launcher, installed with "
            "`pip install accelerate` in this environment"
        )
    return [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        *target,
    ]


def process_environment(processes: int, threads: int | None = None) -> dict[str, str]:
    """This environment with this process's threads split between the processes (each would otherwise take them all,
    and `processes` x `threads` threads on the cores slow every one of them)."""
    if threads is None:
        threads = max(1, torch.get_num_threads() // processes)
    return dict(os.environ, OMP_NUM_THREADS=str(threads))
