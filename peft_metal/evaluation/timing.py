"""Wall-clock timing of model work: CUDA runs asynchronously, so a timer must wait for the device first."""

from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
