"""Every place peft-metal relies on how another library works inside, in one module.

Each function here is covered by `tests/test_compat.py`, which fails loudly when an upgrade changes what it relies on.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

# RoPE variants whose rotation of a position does not depend on the sequence length, so attention scores depend
# only on position differences and a block of tokens may be placed at any offset (negative ones included).
SHIFT_INVARIANT_ROPE_TYPES = ("default", "linear", "llama3")


def has_shift_invariant_positions(lm: PreTrainedModel) -> bool:
    """Whether `lm` encodes positions only by a fixed rotary embedding (Llama, Qwen2, Gemma, SmolLM2, ...).

    transformers 5 keeps the rotary settings in `config.rope_parameters`; models with learned absolute positions
    (GPT-2) have none.
    """
    config = lm.config.get_text_config(decoder=True)
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:
        return False
    return rope["rope_type"] in SHIFT_INVARIANT_ROPE_TYPES


def cache_from_layers(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A new `DynamicCache` holding the given per-layer (keys, values); extending it never touches the given tensors.

    `ddp_cache_data` is the only constructor argument of transformers 5's DynamicCache that takes ready tensors (it
    concatenates them into each layer, keeping their autograd graph).
    """
    return DynamicCache(ddp_cache_data=layers)


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) a `DynamicCache` holds (batch x kv-heads x length x head-dim each)."""
    return [(layer.keys, layer.values) for layer in cache.layers]
