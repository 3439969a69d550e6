"""Log-likelihoods after a context: of each answer option of a batch of queries (`score_options`), and of every
token of a text (`score_tokens`, what an OpenAI-style `echo` with `logprobs` returns).

Queries are left-padded into one batch after the context (`read_queries`): padding is masked and positions skip it,
so every row sees exactly what it would alone; a single query is a batch of one. Options are then read as one row
each over their query's keys/values, right-padded, so padding follows every real token and (attention being causal)
never changes a scored logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..metal_prompt.reading import check_fits, model_device, positions_from_mask
from .context import Context, Layers, read_tokens, run_lm


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of one continuation: summed over its tokens and the per-token mean (length-normalized)."""

    sum_logprob: float
    mean_logprob: float
    num_tokens: int


@dataclass(frozen=True)
class QueriesRead:
    """A batch of queries read after a context: the next-token logits after each (batch x vocab, float32), the
    keys/values over context + queries, and the attention mask over them (zeros at each row's left padding)."""

    last_logits: torch.Tensor
    layers: Layers
    mask: torch.Tensor


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long, device=device)
    return ids, mask


@torch.no_grad()
def read_queries(
    lm: PreTrainedModel, context: Context, queries: Sequence[Sequence[int]], pad_id: int = 0
) -> QueriesRead:
    """The LM reads each query after the context, all in one left-padded batch.

    A context that already ends with its query (a PEFT baseline reads the query with its own forward) is given with
    one empty query: then nothing is read and the context's own logits are used.
    """
    if len(queries) == 1 and not queries[0] and context.last_logits is not None and context.layers is not None:
        mask = torch.ones(1, context.length, dtype=torch.long, device=context.last_logits.device)
        return QueriesRead(context.last_logits.unsqueeze(0), context.layers, mask)
    if not queries or any(not query for query in queries):
        raise ValueError("Every query must have at least one token.")
    check_fits(lm, context.length, max(len(query) for query in queries))
    device = model_device(lm)
    ids, query_mask = left_pad(queries, pad_id, device)
    mask = torch.cat([torch.ones(len(queries), context.length, dtype=torch.long, device=device), query_mask], dim=1)
    output = run_lm(
        lm, ids, mask, positions_from_mask(mask)[:, context.length :], context.layers, keep_cache=True, last_only=True
    )
    return QueriesRead(output.logits[:, -1].float(), output.layers, mask)


# Option rows read in one forward carry a gathered copy of their query's keys/values; this bounds that copy.
OPTION_CACHE_BUDGET_BYTES = 512 * 2**20


def _rows_per_forward(layers: Layers, budget_bytes: int) -> int:
    row_bytes = sum(k[0].numel() * k.element_size() + v[0].numel() * v.element_size() for k, v in layers)
    return max(1, budget_bytes // max(1, row_bytes))


@torch.no_grad()
def score_options(
    lm: PreTrainedModel,
    context: Context,
    queries: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0,
    cache_budget_bytes: int = OPTION_CACHE_BUDGET_BYTES,
) -> list[list[ContinuationScore]]:
    """Log P(option | context, query) for every option of every query, in two forwards rather than one per option:
    the queries in one batch, then every option of every query as one row over its query's keys/values (more
    forwards only when those copies would exceed `cache_budget_bytes`). On a small model the cost of a forward is
    mostly reading the weights, so fewer, wider forwards are what makes batching pay."""
    if any(not option for query_options in options for option in query_options):
        raise ValueError("An empty option has no likelihood to score; every option must have at least one token.")
    read = read_queries(lm, context, queries, pad_id)
    check_fits(lm, read.mask.shape[1], 0, max((len(o) for opts in options for o in opts), default=0), "longest option")
    device = read.mask.device
    first_logprobs = F.log_softmax(read.last_logits, dim=-1)
    scores: list[list[Optional[ContinuationScore]]] = [[None] * len(query_options) for query_options in options]
    rows = [(query, j) for query, query_options in enumerate(options) for j in range(len(query_options))]
    step = _rows_per_forward(read.layers, cache_budget_bytes)
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
            row_mask = read.mask[owner]
            output = run_lm(
                lm,
                ids[:, :-1],  # the last token of the longest option predicts nothing that is scored
                torch.cat([row_mask, option_mask[:, :-1]], dim=1),
                row_mask.sum(-1, keepdim=True) + torch.arange(width - 1, device=device),
                [(k[owner], v[owner]) for k, v in read.layers],
            )
            rest = F.log_softmax(output.logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            token_logprobs = torch.cat([first.unsqueeze(1), rest], dim=1) * option_mask
        else:
            token_logprobs = first.unsqueeze(1)
        sums, lengths = token_logprobs.sum(dim=1), option_mask.sum(dim=1)
        for (query, j), s, n in zip(chunk, sums.tolist(), lengths.tolist()):
            scores[query][j] = ContinuationScore(float(s), float(s / n), int(n))
    return scores  # type: ignore[return-value]


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a text with its log-probability given everything before it (None for a first token with
    nothing before it) and the `top` most likely tokens at its position (token id -> log-probability)."""

    token_id: int
    logprob: Optional[float]
    top: dict[int, float]


@torch.no_grad()
def score_tokens(lm: PreTrainedModel, context: Context, token_ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """Log P(token | context, tokens before it) for every token of `token_ids`, read in one forward."""
    token_ids = list(token_ids)
    if not token_ids:
        return []
    output = read_tokens(lm, context, token_ids)
    device = model_device(lm)
    n = len(token_ids)
    predictors = output.logits[0, :-1].float()  # position i predicts token i + 1
    if context.last_logits is not None:
        predictors = torch.cat([context.last_logits.float().unsqueeze(0), predictors])
    logprobs = F.log_softmax(predictors, dim=-1)
    offset = n - logprobs.shape[0]  # 1 when nothing predicts the first token
    scored = logprobs.gather(-1, torch.tensor(token_ids[offset:], device=device).unsqueeze(-1)).squeeze(-1).tolist()
    tops = torch.topk(logprobs, top, dim=-1) if top > 0 else None
    result = [TokenLogprob(token_ids[0], None, {})] if offset else []
    for i, logprob in enumerate(scored):
        alternatives = {}
        if tops is not None:
            alternatives = dict(zip(tops.indices[i].tolist(), tops.values[i].tolist()))
        result.append(TokenLogprob(token_ids[i + offset], logprob, alternatives))
    return result
