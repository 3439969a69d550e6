"""A PGM whose weights are the mean of several checkpoints of one run (stochastic weight averaging after the fact):
does averaging the iterates of a constant-rate run give what a decayed rate gave the short probes?

    python experiments/average_checkpoints.py --run runs/smollm2-metaicl-with-tasks-long --steps 300,350,400
        --output runs/averaged-300-400

The folder written is a PGM like the run's own exports (the newest checkpoint's config, weights averaged in fp32 and
stored in that checkpoint's dtypes), to score with `peft-metal eval --pgm`. A probe: nothing in the package uses it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME as WEIGHTS  # the file PEFT saves an adapter's weights to
from safetensors.torch import load_file, save_file

from peft_metal.training.checkpoint import CHECKPOINT_PREFIX


def averaged_weights(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the PGMs' saved tensors; every PGM must hold the same names and shapes."""
    states = [load_file(folder / WEIGHTS) for folder in folders]
    names = set(states[0])
    for folder, state in zip(folders[1:], states[1:]):
        if set(state) != names:
            raise ValueError(f"{folder} holds other tensors than {folders[0]}: not checkpoints of one PGM.")
    averaged = {}
    for name in sorted(names):
        total = sum(state[name].float() for state in states)
        averaged[name] = (total / len(states)).to(states[-1][name].dtype).contiguous()
    return averaged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--steps", required=True, help="comma-separated checkpoint steps to average")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    folders = [args.run / f"{CHECKPOINT_PREFIX}{int(step)}" / "pgm" for step in args.steps.split(",")]
    missing = [str(folder) for folder in folders if not (folder / WEIGHTS).is_file()]
    if missing:
        raise SystemExit(f"No saved PGM at {', '.join(missing)}.")
    args.output.mkdir(parents=True, exist_ok=False)
    for name in ("adapter_config.json", "README.md"):
        shutil.copy(folders[-1] / name, args.output / name)
    save_file(averaged_weights(folders), args.output / WEIGHTS, metadata={"format": "pt"})
    (args.output / "averaged_from.txt").write_text("\n".join(str(folder) for folder in folders) + "\n")
    print(f"wrote {args.output}: the mean of {len(folders)} checkpoints")


if __name__ == "__main__":
    main()
