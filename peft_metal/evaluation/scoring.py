"""The frozen LM continuing a context that is computed once: scoring continuations (multiple-choice options) and
greedy decoding, both from a cached context.

Every evaluation method differs only in the context it builds: nothing (zero-shot), demonstration tokens (ICL), or a
generated prompt with its demonstrations (MetaL-Prompt, via `reading.context_cache`). The query is appended to that
context once (`extend_context`), and then all options of the query are scored in one batched forward over the options
alone, with the context's keys/values expanded over the options (`score_continuations`). Nothing is re-encoded per
option, and the cached tensors are only read, so one context serves every query and option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..compat import cache_layers, expand_cache
from ..metal_prompt.prompt import GeneratedPrompt
from ..metal_prompt.reading import context_cache, keeps_logits, max_context_length, model_device

Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Context:
    """What the LM has read so far: per-layer keys/values (batch 1, or None when nothing was read), the number of
    positions they cover, and the next-token logits after the last position (None when unknown, e.g. a prompt's
    context before its query: scoring needs a non-empty `extend_context` first)."""

    layers: Optional[Layers] = None
    length: int = 0
    last_logits: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of one continuation: summed over its tokens and the per-token mean (length-normalized)."""

    sum_logprob: float
    mean_logprob: float
    num_tokens: int


def empty_context() -> Context:
    return Context()


def prompt_context(lm: PreTrainedModel, prompt: GeneratedPrompt) -> Context:
    """The LM after reading a generated prompt and its demonstrations (computed once, reused for every query)."""
    return Context(layers=context_cache(lm, prompt), length=prompt.context_length)


def check_length(lm: PreTrainedModel, context: Context, more: int, what: str) -> None:
    """Refuse inputs the LM cannot see whole (positions would overflow)."""
    limit = max_context_length(lm)
    if limit is not None and context.length + more > limit:
        raise ValueError(
            f"The context ({context.length} tokens) + {what} ({more}) = {context.length + more} tokens, "
            f"{context.length + more - limit} over the model's context of {limit}. Use fewer shots or demonstrations."
        )


@torch.no_grad()
def extend_context(lm: PreTrainedModel, context: Context, token_ids: Sequence[int]) -> Context:
    """The LM reads `token_ids` after `context`; returns the longer context (the given one is left untouched)."""
    token_ids = list(token_ids)
    if not token_ids:
        return context
    check_length(lm, context, len(token_ids), "new tokens")
    device = model_device(lm)
    n = len(token_ids)
    kwargs = {"logits_to_keep": 1} if keeps_logits(lm) else {}
    outputs = lm(
        input_ids=torch.tensor([token_ids], dtype=torch.long, device=device),
        attention_mask=torch.ones(1, context.length + n, dtype=torch.long, device=device),
        position_ids=torch.arange(context.length, context.length + n, device=device).unsqueeze(0),
        past_key_values=expand_cache(context.layers, 1) if context.layers is not None else None,
        use_cache=True,
        **kwargs,
    )
    layers = cache_layers(outputs.past_key_values)
    return Context(layers=layers, length=context.length + n, last_logits=outputs.logits[0, -1].float())


@torch.no_grad()
def score_continuations(
    lm: PreTrainedModel, context: Context, continuations: Sequence[Sequence[int]]
) -> list[ContinuationScore]:
    """Log P(continuation | context) for each continuation, in one batched forward over the continuations only.

    The context's cache is expanded (a view, not a copy) over the batch; continuations are right-padded, so padding
    comes after every real token and, the attention being causal, never changes a real token's logits. The first token
    of each continuation is scored by `context.last_logits`, the others by the continuation's own positions.
    """
    continuations = [list(c) for c in continuations]
    if not continuations:
        return []
    if any(not c for c in continuations):
        raise ValueError("An empty continuation has no likelihood to score; every option must have at least one token.")
    if context.last_logits is None:
        raise ValueError("The context has no next-token logits: extend it with the query before scoring.")
    device = model_device(lm)
    batch, width = len(continuations), max(len(c) for c in continuations)
    check_length(lm, context, width, "longest continuation")
    ids = torch.tensor([c + [0] * (width - len(c)) for c in continuations], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in continuations], dtype=torch.long, device=device)
    first = F.log_softmax(context.last_logits.float(), dim=-1)[ids[:, 0]]  # batch
    if width > 1:
        outputs = lm(
            input_ids=ids[:, :-1],  # the last token of the longest continuation predicts nothing we score
            attention_mask=torch.cat(
                [torch.ones(batch, context.length, dtype=torch.long, device=device), mask[:, :-1]], dim=1
            ),
            position_ids=torch.arange(context.length, context.length + width - 1, device=device).expand(batch, -1),
            past_key_values=expand_cache(context.layers, batch) if context.layers is not None else None,
            use_cache=False,
        )
        rest = F.log_softmax(outputs.logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        token_logprobs = torch.cat([first.unsqueeze(1), rest], dim=1) * mask
    else:
        token_logprobs = first.unsqueeze(1)
    sums = token_logprobs.sum(dim=1)
    lengths = mask.sum(dim=1)
    return [
        ContinuationScore(float(s), float(s / n), int(n)) for s, n in zip(sums.tolist(), lengths.tolist())
    ]


@torch.no_grad()
def greedy_decode(
    lm: PreTrainedModel,
    context: Context,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    stop: Optional[Callable[[list[int]], bool]] = None,
) -> list[int]:
    """Greedy (argmax) tokens after `context` (which must end with the query): stops after `max_new_tokens`, at an
    end-of-sequence token (not returned), or as soon as `stop(tokens so far)` is true."""
    if context.last_logits is None:
        raise ValueError("The context has no next-token logits: extend it with the query before decoding.")
    check_length(lm, context, max_new_tokens, "new tokens")
    tokens: list[int] = []
    eos = set(eos_token_ids)
    for _ in range(max_new_tokens):
        token = int(context.last_logits.argmax())
        if token in eos:
            break
        tokens.append(token)
        if stop is not None and stop(tokens) or len(tokens) == max_new_tokens:
            break
        context = extend_context(lm, context, [token])
    return tokens
