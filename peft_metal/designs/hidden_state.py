"""Hidden-state design: the PGM's final hidden states at the padding positions become the LM's input embeddings."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import PreTrainedModel

from .base import PGMReadout, PromptDesign


class HiddenStateDesign(PromptDesign):
    """The richest soft prompt: no projection onto the vocabulary, just what the LM head would have read."""

    name = "hidden_state"

    def make(
        self, readout: PGMReadout, lm: PreTrainedModel, temperature: float, training: bool
    ) -> dict[str, torch.Tensor]:
        return {"embeds": readout.hidden_states}

    def context_embeds(self, prompt, lm: PreTrainedModel) -> Optional[torch.Tensor]:
        return prompt.embeds
