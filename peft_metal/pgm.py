"""Finding the PGM to serve or evaluate: a given folder or Hub id, else the one shipped for the base model, else a
fresh (untrained) one with a warning."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch

SHIPPED_DIR = Path(__file__).parent / "shipped"
SHIPPED_PGMS = {"smollm2-135m": "smollm2-135m"}  # base model name -> folder under peft_metal/shipped


def shipped_pgm(model_name: str) -> Optional[str]:
    folder = SHIPPED_PGMS.get(model_name)
    path = SHIPPED_DIR / folder if folder else None
    return str(path) if path is not None and (path / "adapter_config.json").is_file() else None


def load_pgm(
    model_name: str, pgm: Optional[str] = None, device: Optional[str] = None, seed: int = 0, warn_untrained: bool = True
) -> tuple[Any, Any, Optional[str]]:
    """(PEFT model in eval mode, tokenizer, where the PGM came from or None for a fresh one)."""
    from peft import PeftModel, get_peft_model

    from .base_models import load_base_model
    from .metal_prompt import MetaLPromptConfig

    device = device or ("cuda" if torch.cuda.is_available() else None)
    lm, tokenizer = load_base_model(model_name, device=device)
    source = pgm or shipped_pgm(model_name)
    if source is not None:
        return PeftModel.from_pretrained(lm, source).eval(), tokenizer, source
    if warn_untrained:
        warnings.warn(
            f"No PGM given and none is shipped for {model_name!r}: using a fresh, untrained PGM. Its metal scores "
            "say nothing about MetaL-Prompt; pass a meta-trained one (--pgm).",
            UserWarning,
            stacklevel=2,
        )
    torch.manual_seed(seed)
    return get_peft_model(lm, MetaLPromptConfig(task_type="CAUSAL_LM")).eval(), tokenizer, None
