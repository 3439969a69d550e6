"""The frozen LM reading [prompt][demonstrations][query]: scoring (`forward_with_prompt`) and decoding
(`generate_with_prompt`).

Both put the prompt and the demonstrations (the "context") before every query of a batch. Queries may be left-padded:
the padding then sits between the context and the query, masked out, and positions are counted over unmasked tokens
only, so a padded query sees exactly what an unpadded one would.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import Cache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..compat import (
    attention_implementation,
    cache_from_layers,
    cache_kwargs,
    cache_layers,
    causal_lm_output,
    custom_attention_mask,
    expand_cache,
    returned_cache,
)
from ..designs import get_design
from .graded_pass import GradedPass, causal_allowed
from .packing import pack_queries as pack_queries_of
from .packing import packed_allowed, packed_mask
from .prompt import GeneratedPrompt
from .queries import QueryBatch


def model_device(lm: PreTrainedModel) -> torch.device:
    """Where the LM's weights are (inputs are built there)."""
    return lm.get_input_embeddings().weight.device


def eos_token_ids(lm: PreTrainedModel, tokenizer: Any) -> list[int]:
    """The ids that end a generation: the LM's generation config's, else the tokenizer's (none when neither has one)."""
    eos = lm.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def max_context_length(lm: PreTrainedModel) -> Optional[int]:
    config = lm.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class ContextTooLongError(ValueError):
    """An input the LM cannot see whole: its positions would run past the model's context."""


def check_fits(lm: PreTrainedModel, context_length: int, query_length: int, after: int = 0, what: str = "new tokens") -> None:
    """The one check that an input fits: refuse what the LM cannot see whole, instead of letting positions overflow
    or truncating. `context_length` is what was read before (prompt and demonstrations), `after` what follows the
    query (new tokens, or the longest answer option, named by `what`)."""
    limit = max_context_length(lm)
    total = context_length + query_length + after
    if limit is not None and total > limit:
        tail = f" + {what} ({after})" if after else ""
        raise ContextTooLongError(
            f"Context ({context_length} tokens: prompt and demonstrations) + query ({query_length}){tail} = {total} "
            f"tokens, {total - limit} over the model's context of {limit}. Send a shorter query, use fewer "
            "demonstrations or ask for fewer new tokens."
        )


def _context(
    lm: PreTrainedModel, prompt: GeneratedPrompt, with_demonstrations: bool = True
) -> tuple[Optional[torch.Tensor], Optional[Cache]]:
    """Embeddings for the prompt and (`with_demonstrations`) the demonstrations (1 x C x hidden, or None), and the
    prefix cache (batch 1, or None)."""
    design = get_design(prompt.design)
    parts = []
    prompt_embeds = design.context_embeds(prompt, lm)
    if prompt_embeds is not None:
        parts.append(prompt_embeds.to(lm.get_input_embeddings().weight.dtype))
    if with_demonstrations and prompt.num_demonstration_tokens:
        parts.append(_demonstration_embeds(lm, prompt))
    embeds = torch.cat(parts).unsqueeze(0) if parts else None
    return embeds, design.context_cache(prompt, batch_size=1)


def _demonstration_embeds(lm: PreTrainedModel, prompt: GeneratedPrompt) -> torch.Tensor:
    embedding = lm.get_input_embeddings()
    return embedding(prompt.demonstrations.to(embedding.weight.device))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count unmasked tokens only, so left padding does not shift a query."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _run_after_cache(
    lm: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Optional[Cache],
    **kwargs: Any,
) -> Any:
    """The LM on `inputs_embeds` after whatever `cache` holds; `attention_mask` covers both, positions skip padding."""
    past_length = cache.get_seq_length() if cache is not None else 0
    return lm(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask)[:, past_length:],
        **cache_kwargs(lm, cache),
        **kwargs,
    )


def _read_into_cache(lm: PreTrainedModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache: Optional[Cache]) -> Cache:
    """The keys/values after the LM has read `inputs_embeds` after `cache`: the decoder alone, since nothing here
    needs logits (the LM head over a vocabulary of tens of thousands costs more than a short read)."""
    return returned_cache(_run_after_cache(lm.base_model, inputs_embeds, attention_mask, cache, use_cache=True))


def keeps_logits(lm: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(lm.forward).parameters


def kept_targets(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The labels that logits kept at a row's last `logits.shape[1]` positions predict (each position the next
    token), aligned with `logits[:, :-1]`: shared by the query loss and the option scores, which must agree."""
    return labels[:, labels.shape[1] - logits.shape[1] + 1 :]


def forward_with_prompt(
    lm: PreTrainedModel,
    prompt: GeneratedPrompt,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    use_cache: bool = False,
    only_labelled_logits: bool = False,
    gradient_from_answers_only: bool = False,
    reading_attention: Optional[str] = None,
    pack_queries: bool = False,
    graded_pass: Optional[GradedPass] = None,
    **kwargs: Any,
) -> CausalLMOutputWithPast:
    """Logits (and the causal LM loss over `labels`) at the query positions only, as `lm(input_ids)` would give them;
    with `use_cache`, also the keys/values over [context][queries] (continuations such as answer options go on there).

    With `only_labelled_logits` (and `labels`), the LM head runs only from the first position that predicts a
    labelled token to the end, and `logits` covers just those last positions: the loss is the same, and training on
    answers (a few tokens at the end of left-padded queries) skips the full-vocabulary head over everything else.

    With `gradient_from_answers_only` (implies `only_labelled_logits`), the demonstrations and the query tokens
    before those positions are read without gradient, and only the prompt and the answer positions with it: the loss
    is the same, but its gradient reaches the prompt only through the answer positions' own attention to it, not
    through how the prompt changed the hidden states of the demonstrations and the query's earlier tokens.
    Meta-training uses it because the graded pass over those tokens is most of an episode's cost
    (benchmarks/results/episode_profile_contiguous_head.md). `reading_attention` names the attention implementation
    for the reads without gradient (default: the model's current one).

    With `pack_queries` (only with `gradient_from_answers_only`, without `use_cache`) the queries are read as packed
    rows instead of a padded batch (`packing.py`): the same loss, without work on padding; `logits` then covers the
    packed row's graded positions (1 x tokens x vocab), so use it only for the loss.

    With a `graded_pass` (`graded_pass.py`, without `use_cache`) the last read, of the positions that carry the
    gradient (the padded batch's, or the packed graded row), is that bucketed pass (compiled or not) instead of
    transformers' forward: the same logits.

    Differentiable in the prompt, so the loss of a prompt made in train mode trains the PGM.
    """
    batch_size, query_length = input_ids.shape
    check_fits(lm, prompt.context_length, query_length)
    if gradient_from_answers_only and labels is None:
        raise ValueError("gradient_from_answers_only needs labels: they say where the answers start.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if pack_queries:
        if not gradient_from_answers_only or use_cache:
            raise ValueError("pack_queries reads the answers apart from their queries: it needs gradient_from_answers_only and no use_cache.")
        return _forward_packed(lm, prompt, QueryBatch(input_ids, attention_mask, labels), reading_attention, graded_pass)
    # The context is read once (batch 1) and every query continues from its keys/values, instead of being repeated
    # in every row; the keys/values keep their autograd graph, so training through them reaches the prompt.
    layers = _context_layers(lm, prompt, graded_demonstrations=not gradient_from_answers_only, reading_attention=reading_attention)
    full_mask = torch.cat([attention_mask.new_ones(batch_size, prompt.context_length), attention_mask], dim=1)
    kept = query_length
    if (only_labelled_logits or gradient_from_answers_only) and labels is not None:
        labelled = (labels[:, 1:] != -100).any(dim=0).nonzero()
        kept = query_length - int(labelled[0]) if len(labelled) else 1
    if keeps_logits(lm):
        kwargs["logits_to_keep"] = kept
    query_embeds = lm.get_input_embeddings()(input_ids)
    ungraded = query_length - kept if gradient_from_answers_only else 0
    if ungraded:
        layers = _extend_without_gradient(
            lm, layers, query_embeds[:, :ungraded], full_mask[:, : prompt.context_length + ungraded], reading_attention
        )
        query_embeds = query_embeds[:, ungraded:]
    if graded_pass is not None and not use_cache:
        positions = positions_from_mask(full_mask)[:, -query_embeds.shape[1] :]
        logits = graded_pass(layers, query_embeds, causal_allowed(full_mask, layers[0][0].shape[2]), positions)[:, -kept:]
        outputs = None
    else:
        cache = expand_cache(layers, batch_size)  # batch-1 layers repeat per row; rows read without gradient stay as they are
        outputs = _run_after_cache(lm, query_embeds, full_mask, cache, use_cache=use_cache, **kwargs)
        logits = outputs.logits[:, -kept:]
    loss = None
    if labels is not None:
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            kept_targets(logits, labels).reshape(-1),
            ignore_index=-100,
        )
    return causal_lm_output(loss, logits, returned_cache(outputs) if use_cache else None)


def _forward_packed(
    lm: PreTrainedModel,
    prompt: GeneratedPrompt,
    batch: QueryBatch,
    reading_attention: Optional[str],
    graded_pass: Optional[GradedPass] = None,
) -> CausalLMOutputWithPast:
    """`forward_with_prompt` with `gradient_from_answers_only` on packed rows (see `packing.py`); the graded row
    through `graded_pass` when one is given."""
    packed = pack_queries_of(batch)
    layers = _context_layers(lm, prompt, graded_demonstrations=False, reading_attention=reading_attention)
    context_length = prompt.context_length
    embed = lm.get_input_embeddings()
    dtype = embed.weight.dtype
    if packed.prefix_ids.shape[1]:
        detached = [(k.detach(), v.detach()) for k, v in layers]
        mask = packed_mask(
            context_length, packed.prefix_segments, packed.prefix_positions,
            packed.prefix_segments, packed.prefix_positions, dtype,
        )
        with torch.no_grad(), attention_implementation(lm, reading_attention):
            read = lm.base_model(
                inputs_embeds=embed(packed.prefix_ids),
                attention_mask=mask,
                position_ids=packed.prefix_positions + context_length,
                **cache_kwargs(lm.base_model, cache_from_layers(detached)),
                use_cache=True,
            )
        layers = [
            (torch.cat([k, read_k[:, :, context_length:]], dim=2), torch.cat([v, read_v[:, :, context_length:]], dim=2))
            for (k, v), (read_k, read_v) in zip(layers, cache_layers(returned_cache(read)))
        ]
    allowed = packed_allowed(
        context_length,
        torch.cat([packed.prefix_segments, packed.graded_segments]),
        torch.cat([packed.prefix_positions, packed.graded_positions], dim=1),
        packed.graded_segments, packed.graded_positions,
    )
    embeds, positions = embed(packed.graded_ids), packed.graded_positions + context_length
    if graded_pass is not None:
        logits = graded_pass(layers, embeds, allowed.unsqueeze(0), positions)
    else:
        logits = lm(
            inputs_embeds=embeds,
            attention_mask=custom_attention_mask(allowed, dtype),
            position_ids=positions,
            **cache_kwargs(lm, cache_from_layers(layers)),
            use_cache=False,
        ).logits
    loss = F.cross_entropy(logits[0].float(), packed.targets[0], ignore_index=-100)
    return causal_lm_output(loss, logits, None)


def _extend_without_gradient(
    lm: PreTrainedModel,
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    attention: Optional[str] = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer keys/values of the context (batch 1, its graph kept) followed by `inputs_embeds` (demonstrations,
    or the start of each query), which are read without gradient, with the `attention` implementation, after a
    detached copy of the context; one row per row of `inputs_embeds`."""
    batch_size = inputs_embeds.shape[0]
    detached = [(k.detach(), v.detach()) for k, v in layers]
    with torch.no_grad(), attention_implementation(lm, attention):
        read = _read_into_cache(lm, inputs_embeds, attention_mask, expand_cache(detached, batch_size))
    context_length = layers[0][0].shape[2]
    return [
        (torch.cat([k.expand(batch_size, -1, -1, -1), read_k[:, :, context_length:]], dim=2),
         torch.cat([v.expand(batch_size, -1, -1, -1), read_v[:, :, context_length:]], dim=2))
        for (k, v), (read_k, read_v) in zip(layers, cache_layers(read))
    ]


def _context_layers(
    lm: PreTrainedModel,
    prompt: GeneratedPrompt,
    graded_demonstrations: bool = True,
    reading_attention: Optional[str] = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer keys/values (batch 1) after the LM has read the prompt and the demonstrations; without
    `graded_demonstrations` the demonstrations are read without gradient, with `reading_attention` (see
    `gradient_from_answers_only`)."""
    embeds, cache = _context(lm, prompt, with_demonstrations=graded_demonstrations)
    length = prompt.context_length - (0 if graded_demonstrations else prompt.num_demonstration_tokens)
    if embeds is not None:
        cache = _read_into_cache(lm, embeds, torch.ones(1, length, dtype=torch.long, device=embeds.device), cache)
    layers = cache_layers(cache)
    if not graded_demonstrations and prompt.num_demonstration_tokens:
        mask = torch.ones(1, prompt.context_length, dtype=torch.long, device=layers[0][0].device)
        layers = _extend_without_gradient(lm, layers, _demonstration_embeds(lm, prompt).unsqueeze(0), mask, reading_attention)
    return layers


@torch.no_grad()
def context_cache(lm: PreTrainedModel, prompt: GeneratedPrompt) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer keys/values (batch 1) after the LM has read the prompt and the demonstrations: the state every query
    of this prompt starts from, computed once per call instead of once per query."""
    return _context_layers(lm, prompt)


def generate_with_prompt(
    lm: PreTrainedModel,
    prompt: GeneratedPrompt,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    **generate_kwargs: Any,
) -> Any:
    """`lm.generate` for the queries alone, with the prompt and demonstrations read first.

    Returns what `lm.generate(input_ids)` returns: the query ids followed by the new tokens. The context enters as a
    ready cache; generate needs ids for the cached positions too, so they are filled with placeholders that are
    never embedded and are cut from the output.
    """
    batch_size, query_length = input_ids.shape
    generate_kwargs["max_new_tokens"] = _new_token_budget(lm, query_length, generate_kwargs)
    check_fits(lm, prompt.context_length, query_length, generate_kwargs["max_new_tokens"])
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = expand_cache(context_cache(lm, prompt), batch_size * _expansion(lm, generate_kwargs))
    context_length = prompt.context_length
    placeholder_id = lm.generation_config.pad_token_id or lm.generation_config.eos_token_id or 0
    if isinstance(placeholder_id, list):
        placeholder_id = placeholder_id[0]
    placeholders = input_ids.new_full((batch_size, context_length), placeholder_id)
    outputs = lm.generate(
        input_ids=torch.cat([placeholders, input_ids], dim=1),
        attention_mask=torch.cat([attention_mask.new_ones(batch_size, context_length), attention_mask], dim=1),
        **cache_kwargs(lm, cache),
        **generate_kwargs,
    )
    if isinstance(outputs, torch.Tensor):
        return outputs[:, context_length:]
    outputs.sequences = outputs.sequences[:, context_length:]
    return outputs


def _new_token_budget(lm: PreTrainedModel, query_length: int, generate_kwargs: dict[str, Any]) -> int:
    """`max_new_tokens`, also when the caller gave `max_length`: that counts the query and new tokens only, as for
    `lm.generate` on the query alone, never the hidden context."""
    max_length = generate_kwargs.pop("max_length", None)
    if generate_kwargs.get("max_new_tokens") is not None:
        return generate_kwargs["max_new_tokens"]
    if max_length is None and lm.generation_config.max_new_tokens is not None:
        return lm.generation_config.max_new_tokens
    max_length = max_length if max_length is not None else lm.generation_config.max_length
    if max_length <= query_length:
        raise ValueError(
            f"max_length={max_length} leaves no room for new tokens after a query of {query_length} tokens; "
            "pass max_new_tokens instead."
        )
    return max_length - query_length


def _expansion(lm: PreTrainedModel, generate_kwargs: dict[str, Any]) -> int:
    """How many rows generate makes of each query row: beams for beam search, else returned sequences."""
    num_beams = generate_kwargs.get("num_beams") or lm.generation_config.num_beams or 1
    if num_beams > 1:
        return num_beams
    return generate_kwargs.get("num_return_sequences") or lm.generation_config.num_return_sequences or 1
