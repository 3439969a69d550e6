"""Identity of a base LM, so a prompt is never read by a model it was not made for."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from transformers import PreTrainedModel


def base_model_fingerprint(lm: PreTrainedModel) -> dict[str, Any]:
    """Architecture, sizes, vocabulary and a hash of the input embeddings.

    The hash is taken over the embeddings rounded to bfloat16, so the same weights loaded in float32 or bfloat16 (or
    moved between devices) keep one fingerprint, while any other checkpoint gets another.
    """
    config = lm.config.get_text_config(decoder=True)
    embeddings = lm.get_input_embeddings().weight.detach()
    digest = hashlib.sha256(embeddings.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()).hexdigest()
    return {
        "architecture": type(lm).__name__,
        "model_type": config.model_type,
        "hidden_size": int(embeddings.shape[1]),
        "num_layers": int(config.num_hidden_layers),
        "vocab_size": int(embeddings.shape[0]),
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        "embedding_sha256": digest[:16],
    }


def describe(fingerprint: dict[str, Any]) -> str:
    return (
        f"{fingerprint.get('architecture')} ({fingerprint.get('model_type')}, {fingerprint.get('num_layers')} layers, "
        f"hidden {fingerprint.get('hidden_size')}, vocab {fingerprint.get('vocab_size')}, "
        f"embeddings {fingerprint.get('embedding_sha256')})"
    )


def check_same_base(prompt_fingerprint: dict[str, Any], model_fingerprint: dict[str, Any]) -> None:
    if prompt_fingerprint != model_fingerprint:
        raise ValueError(
            "This prompt was made for another base model: the prompt's is "
            f"{describe(prompt_fingerprint)}, this model's is {describe(model_fingerprint)}. "
            "Generate the prompt again with a PGM on this base model."
        )
