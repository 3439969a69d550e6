"""What every prompt design does: turn the PGM's readout at the padding positions into a prompt, and hand that prompt
to the frozen LM as input embeddings or as attention keys/values."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from transformers import Cache, PreTrainedModel


@dataclass
class PGMReadout:
    """The PGM's forward pass over [XP; padding], seen at the K padding positions."""

    hidden_states: torch.Tensor  # K x hidden, the final (normalized) hidden states the LM head reads
    cache: Optional[Cache] = None  # keys/values over all positions; only computed for designs that need them

    @property
    def num_tokens(self) -> int:
        return self.hidden_states.shape[0]


EMBEDDINGS = "embeddings"  # the LM reads the prompt as K input embeddings
KEYS_VALUES = "keys_values"  # the LM attends to the prompt as K keys/values in every layer


class PromptDesign(ABC):
    """One way to read a prompt out of the PGM (`make`) and to feed it to the LM (`context_embeds`/`context_cache`).

    Each design also declares what its prompt is, so nothing outside `designs/` needs to know design names: the
    payload tensors it carries (and at which axis they hold the K positions), whether the LM reads it as embeddings
    or keys/values, whether it is made of vocabulary tokens (then it is plain text any LM service can read), and what
    refinement tunes (`tunable_payload`).
    """

    name: ClassVar[str]
    needs_cache: ClassVar[bool] = False
    payload: ClassVar[dict[str, int]] = {"embeds": 0}  # tensor name -> the axis of its K positions
    optional_payload: ClassVar[tuple[str, ...]] = ()  # also saved when present
    reads_as: ClassVar[str] = EMBEDDINGS
    is_text: ClassVar[bool] = False

    @abstractmethod
    def make(
        self, readout: PGMReadout, lm: PreTrainedModel, temperature: float, training: bool
    ) -> dict[str, torch.Tensor]:
        """The prompt's payload tensors (see `GeneratedPrompt`), differentiable when `training`."""

    def context_embeds(self, prompt, lm: PreTrainedModel) -> Optional[torch.Tensor]:
        """K x hidden embeddings the LM reads before the demonstrations, or None if the prompt is not embeddings."""
        return None

    def context_cache(self, prompt, batch_size: int) -> Optional[Cache]:
        """Keys/values the LM attends to before everything else, or None."""
        return None

    def tunable_payload(self, prompt, lm: PreTrainedModel) -> dict[str, torch.Tensor]:
        """The tensors prompt tuning (`refine_prompt`) starts from: the prompt as the LM reads it."""
        return {name: getattr(prompt, name) for name in self.payload}

    def describe(self, prompt) -> str:
        """A short human description of the prompt's content."""
        return ", ".join(f"{name} of shape {tuple(getattr(prompt, name).shape)}" for name in self.payload)


def pgm_logits(readout: PGMReadout, lm: PreTrainedModel) -> torch.Tensor:
    """Next-token logits at the padding positions, through the LM's own head (K x vocab, float32)."""
    return lm.get_output_embeddings()(readout.hidden_states).float()
