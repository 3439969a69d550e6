"""Batched reads of one shared context: many queries after the same prompt (or after nothing) in one LM call.

`scoring.py` reads one query at a time after a cached context; the server gets many queries for the same prompt at
once and reads them together. The queries are left-padded into one batch after the context's keys/values (expanded,
never copied or mutated); padding is masked and positions skip it, so every row sees exactly what it would alone
(`reading.py` does the same for `forward_with_prompt`). Two operations:

* `generate_batch`: greedy or sampled decoding, each row stopping on its own (end of sequence, the template's stop
  strings, its own `max_new_tokens`); finished rows leave the batch.
* `score_options_batch`: log-likelihood (summed and length-normalized) of each query's options, as
  `scoring.score_continuations` computes them for one query: the queries in one forward, then all their options in
  another (each option a row over its query's cache).

Everything here runs in the server's single model thread; nothing is concurrent with the PGM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from ..compat import cache_from_layers, cache_layers, expand_cache
from ..evaluation.scoring import Context, ContinuationScore
from ..metal_prompt.reading import keeps_logits, model_device, positions_from_mask


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    finish_reason: str  # "stop" (a stop string), "eos" or "length"


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long, device=device)
    return ids, mask


def _select_rows(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    return cache_from_layers([(keys[index], values[index]) for keys, values in cache_layers(cache)])


@torch.no_grad()
def read_queries(
    lm: PreTrainedModel, context: Context, queries: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """The LM reads each (non-empty) query after the context, all in one left-padded batch.

    Returns the next-token logits after each query (batch x vocab, float32), the cache over context + queries and the
    attention mask over it (batch x (context + widest query); zeros at each row's padding).
    """
    if any(not query for query in queries):
        raise ValueError("Every query must have at least one token.")
    device = model_device(lm)
    batch = len(queries)
    ids, query_mask = _left_pad(queries, pad_id, device)
    mask = torch.cat([torch.ones(batch, context.length, dtype=torch.long, device=device), query_mask], dim=1)
    positions = positions_from_mask(mask)[:, context.length :]
    kwargs = {"logits_to_keep": 1} if keeps_logits(lm) else {}
    outputs = lm(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=expand_cache(context.layers, batch) if context.layers is not None else None,
        use_cache=True,
        **kwargs,
    )
    return outputs.logits[:, -1].float(), outputs.past_key_values, mask


def _pick(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probabilities = F.softmax(logits.float() / temperature, dim=-1).cpu()
    return int(torch.multinomial(probabilities, 1, generator=generator))


@torch.no_grad()
def generate_batch(
    lm: PreTrainedModel,
    context: Context,
    queries: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    temperatures: Sequence[float],
    generators: Sequence[Optional[torch.Generator]],
    eos_token_ids: Sequence[int] = (),
    stop: Optional[Callable[[list[int]], bool]] = None,
    pad_id: int = 0,
) -> list[Generation]:
    """New tokens for each query after the context. With temperature 0 a row gets exactly what
    `scoring.greedy_decode(extend_context(context, query))` gives it; otherwise it samples from softmax(logits / T)."""
    logits, cache, mask = read_queries(lm, context, queries, pad_id)
    device = mask.device
    eos = set(eos_token_ids)
    tokens: list[list[int]] = [[] for _ in queries]
    reasons: list[Optional[str]] = [None] * len(queries)
    active = list(range(len(queries)))  # original index of each row still in the batch
    while True:
        fed, keep = [], []
        for row, index in enumerate(active):
            token = _pick(logits[row], temperatures[index], generators[index])
            if token in eos:
                reasons[index] = "eos"
                continue
            tokens[index].append(token)
            if stop is not None and stop(tokens[index]):
                reasons[index] = "stop"
            elif len(tokens[index]) >= max_new_tokens[index]:
                reasons[index] = "length"
            else:
                keep.append(row)
                fed.append(token)
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            cache, mask = _select_rows(cache, rows), mask[rows]
            active = [active[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        outputs = lm(
            input_ids=torch.tensor(fed, dtype=torch.long, device=device).unsqueeze(1),
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            past_key_values=cache,
            use_cache=True,
        )
        logits, cache = outputs.logits[:, -1].float(), outputs.past_key_values
    return [Generation(row_tokens, reason or "length") for row_tokens, reason in zip(tokens, reasons)]


# Option rows read in one forward carry a gathered copy of their query's cache; this bounds that copy.
OPTION_CACHE_BUDGET_BYTES = 512 * 2**20


def _rows_per_forward(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], budget_bytes: int) -> int:
    row_bytes = sum(k[0].numel() * k.element_size() + v[0].numel() * v.element_size() for k, v in layers)
    return max(1, budget_bytes // max(1, row_bytes))


@torch.no_grad()
def score_options_batch(
    lm: PreTrainedModel,
    context: Context,
    queries: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0,
    cache_budget_bytes: int = OPTION_CACHE_BUDGET_BYTES,
) -> list[list[ContinuationScore]]:
    """Log P(option | context, query) for every option of every query (as `scoring.score_continuations` does for
    one query), in two forwards rather than one per option: the queries in one batch, then every option of every
    query as one row over its query's cache (more forwards only when those copies would exceed
    `cache_budget_bytes`). On a small model the cost of a forward is mostly reading the weights, so fewer, wider
    forwards are what makes batching pay."""
    if any(not option for query_options in options for option in query_options):
        raise ValueError("An empty option has no likelihood to score; every option must have at least one token.")
    last_logits, cache, mask = read_queries(lm, context, queries, pad_id)
    device = mask.device
    first_logprobs = F.log_softmax(last_logits, dim=-1)
    layers = cache_layers(cache)
    scores: list[list[Optional[ContinuationScore]]] = [[None] * len(query_options) for query_options in options]
    rows = [(query, j) for query, query_options in enumerate(options) for j in range(len(query_options))]
    step = _rows_per_forward(layers, cache_budget_bytes)
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        tokens = [list(options[query][j]) for query, j in chunk]
        owner = torch.tensor([query for query, _ in chunk], dtype=torch.long, device=device)
        width = max(len(option) for option in tokens)
        ids = torch.tensor([option + [pad_id] * (width - len(option)) for option in tokens], device=device)
        option_mask = torch.tensor(
            [[1] * len(option) + [0] * (width - len(option)) for option in tokens], dtype=torch.long, device=device
        )
        first = first_logprobs[owner, ids[:, 0]]
        if width > 1:
            # Right padding after every real token: causal attention keeps it from changing any scored logit.
            row_mask = mask[owner]
            outputs = lm(
                input_ids=ids[:, :-1],
                attention_mask=torch.cat([row_mask, option_mask[:, :-1]], dim=1),
                position_ids=row_mask.sum(-1, keepdim=True) + torch.arange(width - 1, device=device),
                past_key_values=cache_from_layers([(k[owner], v[owner]) for k, v in layers]),
                use_cache=False,
            )
            rest = F.log_softmax(outputs.logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            token_logprobs = torch.cat([first.unsqueeze(1), rest], dim=1) * option_mask
        else:
            token_logprobs = first.unsqueeze(1)
        sums, lengths = token_logprobs.sum(dim=1), option_mask.sum(dim=1)
        for (query, j), s, n in zip(chunk, sums.tolist(), lengths.tolist()):
            scores[query][j] = ContinuationScore(float(s), float(s / n), int(n))
    return scores  # type: ignore[return-value]
