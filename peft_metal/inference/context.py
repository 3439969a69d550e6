"""What the frozen LM has read so far, as a `Context` that any number of queries continue from.

A context is per-layer keys/values over a batch of one (the prompt and demonstrations, or nothing), the number of
positions they cover and the next-token logits after them. It is computed once and only ever read: every LM call
here gets a fresh cache of expanded views of it (`run_lm`), so one context serves every query, option and request.
The keys/values are kept as plain per-layer tensors; a transformers `Cache` exists only for the length of one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers import PreTrainedModel

from ..compat import cache_kwargs, cache_layers, expand_cache, returned_cache
from ..metal_prompt.prompt import GeneratedPrompt
from ..metal_prompt.reading import check_fits, context_cache, keeps_logits, model_device

Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Context:
    """What the LM has read: per-layer keys/values (batch 1; None when nothing was read), the number of positions
    they cover, and the next-token logits after the last one (None when unknown: a prompt's context before its
    query)."""

    layers: Optional[Layers] = None
    length: int = 0
    last_logits: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class LMOutput:
    logits: torch.Tensor  # batch x positions kept x vocab
    layers: Optional[Layers]  # keys/values over everything read, when asked for


def run_lm(
    lm: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    past: Optional[Layers],
    *,
    keep_cache: bool = False,
    last_only: bool = False,
) -> LMOutput:
    """The LM reads `input_ids` (batch x width) after `past` (per-layer keys/values, batch 1 or batch-wide); the
    past tensors are only read (a batch-1 past is expanded, never copied). The one place inference calls the LM."""
    cache = expand_cache(past, input_ids.shape[0]) if past is not None else None
    extra = {"logits_to_keep": 1} if last_only and keeps_logits(lm) else {}
    outputs = lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **cache_kwargs(lm, cache),
        use_cache=keep_cache,
        **extra,
    )
    logits = outputs.logits[:, -1:] if last_only else outputs.logits
    return LMOutput(logits=logits, layers=cache_layers(returned_cache(outputs)) if keep_cache else None)


def empty_context() -> Context:
    """Nothing read yet: the plain LM (zero-shot), before any demonstrations."""
    return Context()


@torch.no_grad()
def prompt_context(lm: PreTrainedModel, prompt: GeneratedPrompt) -> Context:
    """The LM after reading a generated prompt and its demonstrations (computed once, reused for every query)."""
    return Context(layers=context_cache(lm, prompt), length=prompt.context_length)


@torch.no_grad()
def extend_context(lm: PreTrainedModel, context: Context, token_ids: Sequence[int]) -> Context:
    """The LM reads `token_ids` after `context`; returns the longer context (the given one is left untouched)."""
    token_ids = list(token_ids)
    if not token_ids:
        return context
    output = read_tokens(lm, context, token_ids, keep_cache=True, last_only=True)
    return Context(layers=output.layers, length=context.length + len(token_ids), last_logits=output.logits[0, -1].float())


def read_tokens(
    lm: PreTrainedModel, context: Context, token_ids: list[int], *, keep_cache: bool = False, last_only: bool = False
) -> LMOutput:
    """The LM reads one row of `token_ids` (at least one) after `context`, at the positions that follow it."""
    check_fits(lm, context.length, len(token_ids))
    device = model_device(lm)
    end = context.length + len(token_ids)
    return run_lm(
        lm,
        torch.tensor([token_ids], dtype=torch.long, device=device),
        torch.ones(1, end, dtype=torch.long, device=device),
        torch.arange(context.length, end, device=device).unsqueeze(0),
        context.layers,
        keep_cache=keep_cache,
        last_only=last_only,
    )
