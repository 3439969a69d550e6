"""The meta-training objective for one episode: -log P_LM(y | prompt(XP), XL, x), averaged over its queries.

It is an `nn.Module` so that `accelerate` can wrap it (for several GPUs the gradient sync of DDP is set up by the
wrapper's forward, and the PGM's work happens inside this forward).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data import Episode
from ..metal_prompt import ShotTemplate
from ..metal_prompt.queries import QueryBatch, encode_queries
from ..metal_prompt.reading import model_device, positions_from_mask


class EpisodeLoss(nn.Module):
    """Wraps the PEFT model; `forward(episode)` makes the prompt from XP in train mode and scores the queries."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        distillation_weight: float = 0.0,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.distillation_weight = distillation_weight
        self.chunk_size = chunk_size

    @property
    def template(self) -> ShotTemplate:
        return self.model.base_model.template

    def forward(self, episode: Episode) -> dict[str, torch.Tensor]:
        shots = [example.as_shot() for example in episode.xp + episode.xl]
        prompt = self.model.generate_prompt(
            shots, tokenizer=self.tokenizer, num_demonstrations=len(episode.xl), chunk_size=self.chunk_size
        )
        device = model_device(self.model.get_base_model())
        batch = encode_queries([e.as_shot() for e in episode.queries], self.tokenizer, self.template, device)
        outputs = self.model(
            prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        losses = {"lm_loss": outputs.loss}
        if self.distillation_weight > 0:
            losses["distillation"] = self._distillation(episode, batch, outputs.logits)
        losses["loss"] = losses["lm_loss"] + self.distillation_weight * losses.get("distillation", 0.0)
        return losses

    def _distillation(self, episode: Episode, batch: QueryBatch, student_logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) on the answer tokens, where the teacher is the LM given all k shots as plain
        demonstrations (MEND's distillation): the prompt should tell the LM what the full context would have."""
        context = self.tokenizer(
            self.template.format_shots([example.as_shot() for example in episode.xp + episode.xl]),
            add_special_tokens=False,
            return_tensors="pt",
        ).input_ids.to(batch.input_ids.device)
        lm = self.model.get_base_model()
        size = batch.input_ids.shape[0]
        input_ids = torch.cat([context.expand(size, -1), batch.input_ids], dim=1)
        mask = torch.cat([torch.ones_like(context).expand(size, -1), batch.attention_mask], dim=1)
        positions = positions_from_mask(mask)
        with torch.no_grad(), self.model.base_model._lora(False):
            teacher_logits = lm(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        teacher_logits = teacher_logits[:, -batch.input_ids.shape[1] :]
        answer = batch.labels[:, 1:] != -100
        teacher = F.log_softmax(teacher_logits[:, :-1][answer].float(), dim=-1)
        student = F.log_softmax(student_logits[:, :-1][answer].float(), dim=-1)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean")
