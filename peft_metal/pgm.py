"""Making and loading PGMs: `load_pretrained_pgm` (the public one call: an LM with a meta-trained PGM, the shipped one
or a given folder or Hub id), `get_peft_model` (PEFT's, for a fresh PGM to meta-train), `attach_pgm` (the one way a
saved PGM is put on an LM), and `load_pgm`, what the commands serve or evaluate: a given PGM, else the shipped one,
else a fresh (untrained) one with a warning."""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import peft
import torch

from .compat import peft_wrapping_quietly

SHIPPED_DIR = Path(__file__).parent / "shipped"
SHIPPED_PGMS = {"smollm2-135m": "smollm2-135m"}  # base model name -> folder under peft_metal/shipped


def check_pgm_folder(folder: Union[str, os.PathLike]) -> None:
    """Refuse, by name, a folder that is not a saved MetaL-Prompt PGM before PEFT reads it (PEFT answers a missing or
    foreign `peft_type` with a bare KeyError). The config's own fields are checked by `MetaLPromptConfig` as it loads."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{folder} holds no adapter_config.json: it is not a saved PGM (save one with save_pretrained).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not a JSON file ({error}); re-save the PGM with save_pretrained.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not the object of a PEFT config.")
    if config.get("peft_type") != "METAL_PROMPT":
        raise ValueError(
            f"{path} has peft_type {config.get('peft_type')!r}: it is not a MetaL-Prompt PGM (peft_type METAL_PROMPT)."
        )


@functools.wraps(peft.get_peft_model)
def get_peft_model(model: Any, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
    """PEFT's `get_peft_model` (a fresh PGM for a `MetaLPromptConfig`), without the FutureWarning PEFT 0.21 causes on
    transformers 5 at every call (`compat.peft_wrapping_quietly`). Like PEFT's, it changes `model` in place."""
    with peft_wrapping_quietly():
        return peft.get_peft_model(model, peft_config, *args, **kwargs)


def check_bare_lm(lm: Any) -> None:
    """Refuse an LM that already carries adapters: PEFT would stack the new PGM over them (warning only), and
    `get_peft_model` puts its PGM's layers into the LM object it is given, so that LM is no longer the plain one."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(lm, PeftModel) or any(isinstance(module, BaseTunerLayer) for module in lm.modules()):
        raise ValueError(
            "This LM already carries a PGM or other adapter (get_peft_model wraps the LM it is given in place), so a "
            "saved PGM would be stacked over it. Load the base model again (load_base_model), or take the PGM out "
            "first with model.base_model.remove_pgm()."
        )


def attach_pgm(lm: Any, source: Union[str, os.PathLike], is_trainable: bool = False) -> Any:
    """`lm` (a plain LM, checked) with the PGM saved at `source` (a folder, checked first, or a Hub id) as PEFT loads
    it."""
    from peft import PeftModel

    check_bare_lm(lm)
    if Path(source).is_dir():
        check_pgm_folder(source)
    try:
        with peft_wrapping_quietly():
            return PeftModel.from_pretrained(lm, source, is_trainable=is_trainable)
    except RuntimeError as error:
        if "Error(s) in loading state_dict" not in str(error):
            raise
        problems = str(error).split("\n\t", 1)[-1].splitlines()[0]
        raise ValueError(
            f"The PGM at {source} does not fit its own adapter_config.json ({problems}): the config was edited, or "
            "the weights belong to another PGM. Re-save it with save_pretrained."
        ) from None


def record_dev_results(folder: Union[str, os.PathLike], dev_results: dict[str, float]) -> None:
    """Put dev results into a saved PGM's training summary, and so into its model card (the config writes both): a
    figure replaces the one of the same label (method, panel and seeds: the same draw measured again) and every other
    stays, so adding a draw or a panel never drops what the card held; the weights and other facts stay as they are."""
    from .metal_prompt import MetaLPromptConfig

    check_pgm_folder(folder)
    config = MetaLPromptConfig.from_pretrained(str(folder))
    summary = config.training_summary or {}
    config.training_summary = {**summary, "dev_results": {**(summary.get("dev_results") or {}), **dev_results}}
    config.save_pretrained(str(folder))


def shipped_pgm(model_name: str) -> Optional[str]:
    folder = SHIPPED_PGMS.get(model_name)
    path = SHIPPED_DIR / folder if folder else None
    return str(path) if path is not None and (path / "adapter_config.json").is_file() else None


def load_pretrained_pgm(
    base_model: str = "smollm2-135m", pgm: Union[str, os.PathLike, None] = None, device: Optional[str] = None
) -> tuple[Any, Any]:
    """(the PGM on its base LM, in eval mode; the tokenizer): `pgm` (a saved PGM's folder or a Hub id) or, without it,
    the meta-trained PGM shipped for `base_model` ("smollm2-135m", or any transformers causal LM's id or folder).
    Never an untrained PGM: with no PGM given and none shipped it says how to make one."""
    from .base_models import load_base_model

    source = pgm if pgm is not None else shipped_pgm(base_model)
    if source is None:
        shipped = ", ".join(sorted(SHIPPED_PGMS))
        raise ValueError(
            f"No PGM is shipped for {base_model!r} (only for {shipped}): pass pgm= (a saved PGM's folder or Hub id), "
            "or meta-train one (peft-metal train, or get_peft_model(lm, MetaLPromptConfig(...)) in Python)."
        )
    lm, tokenizer = load_base_model(base_model, device=device)
    return attach_pgm(lm, source).eval(), tokenizer


def load_pgm(
    model_name: str, pgm: Optional[str] = None, device: Optional[str] = None, seed: int = 0, warn_untrained: bool = True
) -> tuple[Any, Any, Optional[str]]:
    """(PEFT model in eval mode, tokenizer, where the PGM came from or None for a fresh one)."""
    from .base_models import load_base_model
    from .metal_prompt import MetaLPromptConfig

    device = device or ("cuda" if torch.cuda.is_available() else None)
    lm, tokenizer = load_base_model(model_name, device=device)
    source = pgm or shipped_pgm(model_name)
    if source is not None:
        return attach_pgm(lm, source).eval(), tokenizer, source
    if warn_untrained:
        warnings.warn(
            f"No PGM given and none is shipped for {model_name!r}: using a fresh, untrained PGM. Its metal scores "
            "say nothing about MetaL-Prompt; pass a meta-trained one (--pgm).",
            UserWarning,
            stacklevel=2,
        )
    torch.manual_seed(seed)
    return get_peft_model(lm, MetaLPromptConfig(task_type="CAUSAL_LM")).eval(), tokenizer, None
