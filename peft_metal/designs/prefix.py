"""Prefix design: every layer's keys and values at the padding positions, prepended to the LM's attention."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Cache, PreTrainedModel

from ..compat import expand_cache
from .base import KEYS_VALUES, PGMReadout, PromptDesign


class PrefixDesign(PromptDesign):
    """Like prefix tuning, but the prefix is generated from the shots instead of trained per task.

    The keys keep the rotary positions they had in the PGM's pass; the LM's own tokens continue at position K, as
    after any cached prefix.
    """

    name = "prefix"
    needs_cache = True
    payload = {"keys": 2, "values": 2}  # layers x kv-heads x K x head-dim
    reads_as = KEYS_VALUES

    def make(
        self, readout: PGMReadout, lm: PreTrainedModel, temperature: float, training: bool
    ) -> dict[str, torch.Tensor]:
        k = readout.num_tokens
        layers = readout.cache.layers
        keys = torch.stack([layer.keys[0, :, -k:] for layer in layers])
        values = torch.stack([layer.values[0, :, -k:] for layer in layers])
        return {"keys": keys, "values": values}

    def context_cache(self, prompt, batch_size: int) -> Optional[Cache]:
        return expand_cache([(k.unsqueeze(0), v.unsqueeze(0)) for k, v in zip(prompt.keys, prompt.values)], batch_size)
