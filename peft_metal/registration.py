"""Registers MetaL-Prompt as a PEFT method.

PEFT dispatches every entry point (`get_peft_model`, `PeftConfig.from_pretrained`, `PeftModel.from_pretrained`,
`AutoPeftModelForCausalLM`) on `PeftType`, a closed enum. `register_peft_method` asks plugins to add their member to
that enum first; this module does exactly that, once, and then registers the config and tuner classes. It also
has every save of a PGM's config write the PGM's model card beside it (`MetaLPromptConfig.written_beside`).
"""

from __future__ import annotations

import peft
from packaging.version import Version
from peft.utils import PeftType, register_peft_method

METHOD_NAME = "metal_prompt"
PEFT_TYPE_NAME = METHOD_NAME.upper()
SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))


def check_peft_version(version: str = peft.__version__) -> None:
    """Fail early with the supported range instead of failing later inside PEFT's internals."""
    low, high = SUPPORTED_PEFT
    if not low <= Version(version) < high:
        raise ImportError(
            f"peft-metal supports peft>={low},<{high}, but peft {version} is installed. "
            f"Install a supported version: pip install 'peft>={low},<{high}'"
        )


def register() -> PeftType:
    """Idempotently register MetaL-Prompt with PEFT and return its `PeftType`."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from .compat import add_enum_member
    from .metal_prompt.config import MetaLPromptConfig
    from .metal_prompt.model import MetaLPromptModel
    from .metal_prompt.model_card import write_model_card_beside

    check_peft_version()
    # Every save of a PGM's config (PeftModel.save_pretrained, a card's dev results re-recorded) writes its model card.
    MetaLPromptConfig.written_beside = (write_model_card_beside,)
    peft_type = add_enum_member(PeftType, PEFT_TYPE_NAME)
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(
            name=METHOD_NAME, config_cls=MetaLPromptConfig, model_cls=MetaLPromptModel, prefix=MetaLPromptModel.prefix
        )
    return peft_type
