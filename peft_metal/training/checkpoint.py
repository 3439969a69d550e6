"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds the PGM (`pgm/`, as `save_pretrained` writes it), the optimizer and RNG tensors
(`state.safetensors`) and the rest (`state.json`: optimizer hyperparameters, scheduler, sampler position, step,
Python RNG). It is written under a temporary name and renamed, so a killed run never leaves a half checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..metal_prompt.model import is_pgm_parameter

CHECKPOINT_PREFIX = "checkpoint-"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    sampler,
    extra: dict[str, Any] | None = None,
    accelerator=None,
) -> Path:
    """Write a checkpoint; with an `accelerator` of several processes every process calls this, the main one writes
    the shared state (PGM, optimizer, scheduler) and each other one its own episode stream, RNG and `extra`
    (`rank-N.json`)."""
    process_index = accelerator.process_index if accelerator is not None else 0
    num_processes = accelerator.num_processes if accelerator is not None else 1
    target = Path(directory) / f"{CHECKPOINT_PREFIX}{step}"
    staging = target.with_name(f".{target.name}.tmp")
    if process_index == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _wait(accelerator)
    if process_index > 0:
        (staging / f"rank-{process_index}.json").write_text(json.dumps({**_rank_state(sampler), "extra": extra or {}}))
    _wait(accelerator)
    if process_index == 0:
        model.save_pretrained(staging / "pgm", save_embedding_layers=False)  # see export_pgm
        tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for index, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{index}"] = state
        save_file(tensors, staging / "state.safetensors")
        meta = {
            "step": step,
            "num_processes": num_processes,
            "optimizer": optimizer_meta,
            "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(),
            "python_rng": _python_rng_to_json(random.getstate()),
            "extra": extra or {},
        }
        (staging / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    _wait(accelerator)
    return target


def _wait(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _rank_state(sampler) -> dict[str, Any]:
    """A non-main process's own state: its episode stream and its RNGs (JSON, the torch RNG as base64)."""
    return {
        "sampler": sampler.state_dict(),
        "python_rng": _python_rng_to_json(random.getstate()),
        "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def load_checkpoint(
    directory: Path, model, optimizer, scheduler, sampler, process_index: int = 0, num_processes: int = 1
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote into live objects; returns the JSON metadata (with `step`)."""
    directory = Path(directory)
    _check_same_pgm(directory, model)
    meta = json.loads((directory / "state.json").read_text())
    saved_processes = meta.get("num_processes", 1)
    if saved_processes != num_processes:
        raise ValueError(
            f"Checkpoint {directory} was written by {saved_processes} process(es), this run has {num_processes}: each "
            "process resumes its own episode stream. Resume with the same number of processes."
        )
    tensors = load_file(directory / "state.safetensors")
    weights = load_file(directory / "pgm" / "adapter_model.safetensors")
    _load_pgm_weights(model, weights)
    saved_groups = len(meta["optimizer"]["param_groups"])
    if saved_groups != len(optimizer.param_groups):
        raise ValueError(
            f"Checkpoint {directory} has {saved_groups} optimizer group(s), this run {len(optimizer.param_groups)}: "
            "padding_learning_rate is set in one and not the other. Resume with the settings the run was started with."
        )
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    if process_index == 0:
        sampler.load_state_dict(meta["sampler"])
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(_python_rng_from_json(meta["python_rng"]))
    else:
        own = json.loads((directory / f"rank-{process_index}.json").read_text())
        sampler.load_state_dict(own["sampler"])
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(own["torch_rng"])), dtype=torch.uint8))
        random.setstate(_python_rng_from_json(own["python_rng"]))
        meta["extra"] = own["extra"]  # this process's own counters and text-stage position
    cuda_states = [tensors[key] for key in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta


def latest_checkpoint(directory: Path) -> Path | None:
    candidates = [p for p in Path(directory).glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return max(candidates, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


# What makes a checkpoint's weights mean something else in another run, even where their shapes agree.
PGM_IDENTITY = ("prompt_design", "num_prompt_tokens", "lora_scope", "r", "padding_reparameterization")


def _check_same_pgm(directory: Path, model) -> None:
    saved = json.loads((directory / "pgm" / "adapter_config.json").read_text())
    config = model.peft_config[model.active_adapter]
    defaults = {"lora_scope": "all"}  # checkpoints from before lora_scope existed
    differ = [
        f"{name}: checkpoint {saved.get(name, defaults.get(name))!r}, run {getattr(config, name)!r}"
        for name in PGM_IDENTITY
        if saved.get(name, defaults.get(name)) != getattr(config, name)
    ]
    if differ:
        raise ValueError(
            f"Checkpoint {directory} was made by another kind of PGM ({'; '.join(differ)}). Resume with the settings "
            "it was made with, or train into a new output_dir."
        )


def _load_pgm_weights(model, weights: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights)
    missing = [key for key in result.missing_keys if is_pgm_parameter(key)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Checkpoint does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}."
        )


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
