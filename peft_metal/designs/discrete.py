"""Discrete design: the prompt is K real vocabulary tokens, readable as text and usable by any LM API."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .base import PGMReadout, PromptDesign, pgm_logits


class DiscreteDesign(PromptDesign):
    """argmax of the PGM's logits at serving; in training, Gumbel-softmax with straight-through.

    The straight-through sample is a one-hot vector in the forward pass (so the LM reads exactly the embedding of a
    real token) whose gradient is that of the soft sample, which is how gradients reach the PGM through a discrete
    choice.
    """

    name = "discrete"
    payload = {"token_ids": 0}
    optional_payload = ("embeds",)  # straight-through embeds (train mode) or tuned ones (refine_prompt)
    is_text = True

    def make(
        self, readout: PGMReadout, lm: PreTrainedModel, temperature: float, training: bool
    ) -> dict[str, torch.Tensor]:
        logits = pgm_logits(readout, lm)
        if not training:
            return {"token_ids": logits.argmax(dim=-1)}
        one_hot = F.gumbel_softmax(logits, tau=temperature, hard=True)
        embedding_matrix = lm.get_input_embeddings().weight
        return {"token_ids": one_hot.argmax(dim=-1), "embeds": one_hot.to(embedding_matrix.dtype) @ embedding_matrix}

    def context_embeds(self, prompt, lm: PreTrainedModel) -> Optional[torch.Tensor]:
        if prompt.embeds is not None:  # made in train mode: keep the straight-through path
            return prompt.embeds
        return lm.get_input_embeddings()(prompt.token_ids)

    def tunable_payload(self, prompt, lm: PreTrainedModel) -> dict[str, torch.Tensor]:
        """The embeddings of its tokens (a refined discrete prompt keeps `token_ids` and reads its tuned embeds)."""
        return {"embeds": self.context_embeds(prompt, lm)}

    def describe(self, prompt) -> str:
        return f"text {prompt.text!r}"
