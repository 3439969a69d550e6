"""Weighted-sum design: each prompt position is the PGM's next-token distribution times the LM's word embeddings."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import PreTrainedModel

from .base import PGMReadout, PromptDesign, pgm_logits


class WeightedSumDesign(PromptDesign):
    """softmax(logits / temperature) @ E: a soft token that stays inside the convex hull of real token embeddings."""

    name = "weighted_sum"

    def make(
        self, readout: PGMReadout, lm: PreTrainedModel, temperature: float, training: bool
    ) -> dict[str, torch.Tensor]:
        embedding_matrix = lm.get_input_embeddings().weight
        weights = torch.softmax(pgm_logits(readout, lm) / temperature, dim=-1)
        return {"embeds": weights.to(embedding_matrix.dtype) @ embedding_matrix}

    def context_embeds(self, prompt, lm: PreTrainedModel) -> Optional[torch.Tensor]:
        return prompt.embeds
