"""The pieces every reader of prompts needs from a model: the frozen LM, the shot template, and the PGM's tuner."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from peft import PeftModel
from transformers import PreTrainedModel

from ..metal_prompt import MetaLPromptModel, ShotTemplate


@dataclass
class ModelParts:
    """The frozen LM, the shot template and (for MetaL-Prompt) the tuner that generates prompts."""

    lm: PreTrainedModel
    template: ShotTemplate
    tuner: Optional[MetaLPromptModel] = None

    @classmethod
    def from_model(cls, model: Any, template: Optional[ShotTemplate] = None) -> "ModelParts":
        """From a MetaL-Prompt `PeftModel` (or its tuner); a plain LM is accepted where no prompt is generated."""
        tuner = model.base_model if isinstance(model, PeftModel) else model
        if isinstance(tuner, MetaLPromptModel):
            return cls(lm=tuner.model, template=template or tuner.template, tuner=tuner)
        if isinstance(model, PeftModel):
            raise TypeError(
                f"The PeftModel holds a {type(tuner).__name__} adapter, not a MetaL-Prompt PGM (MetaLPromptModel)."
            )
        if isinstance(model, PreTrainedModel):
            return cls(lm=model, template=template or ShotTemplate())
        raise TypeError(f"model must be a MetaL-Prompt PeftModel or a transformers LM, got {type(model).__name__}.")

    @contextmanager
    def lora_off(self) -> Iterator[None]:
        """Every LM read runs with LoRA off (the tuner keeps it off outside the PGM pass; this makes sure)."""
        with self.tuner.lm_only() if self.tuner is not None else nullcontext():
            yield
