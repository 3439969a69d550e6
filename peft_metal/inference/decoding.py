"""New tokens after a context for a batch of queries, each row with its own sampling settings and stops.

The queries are read in one left-padded batch (`scoring.read_queries`); then every step feeds each live row its
last token, and a row that finishes (end of sequence, a stop, its token budget) leaves the batch. With temperature 0
a row is greedy and gets exactly what it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..metal_prompt.reading import check_fits
from .context import Context, run_lm
from .scoring import read_queries

STOP, EOS, LENGTH = "stop", "eos", "length"


@dataclass
class Sampling:
    """How one row is decoded. `stop(tokens so far)` ends it (the tokens kept); `logprobs` asks for the
    log-probability of each new token and its `logprobs` most likely alternatives (None: not computed);
    `on_token` sees every kept token as soon as it is chosen (streaming)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None
    stop: Optional[Callable[[list[int]], bool]] = None
    logprobs: Optional[int] = None
    on_token: Optional[Callable[[int], None]] = None


@dataclass
class Generation:
    tokens: list[int]
    finish_reason: str  # STOP (a stop), EOS or LENGTH
    # With `Sampling.logprobs`: per new token, its log-probability and the top alternatives (token id -> logprob);
    # a row ended by an end-of-sequence token has one more entry, for that token (`eos_token`, not in `tokens`).
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    eos_token: Optional[int] = None


def _pick(logits: torch.Tensor, sampling: Sampling) -> int:
    """Greedy at temperature 0; otherwise a draw from softmax(logits / T), cut to the top-p nucleus."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    # Shifted by the maximum and in float64, so a temperature or top_p near zero (5e-324) leaves the top token
    # rather than an infinity, a NaN or an empty nucleus.
    logits = logits.double()
    probabilities = F.softmax((logits - logits.max()) / sampling.temperature, dim=-1).cpu()
    if sampling.top_p < 1.0:
        ordered, order = probabilities.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered >= sampling.top_p  # the smallest prefix reaching top_p stays
        outside[0] = False
        probabilities = probabilities.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probabilities, 1, generator=sampling.generator))


@torch.no_grad()
def generate(
    lm: PreTrainedModel,
    context: Context,
    queries: Sequence[Sequence[int]],
    sampling: Sequence[Sampling],
    eos_token_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> list[Generation]:
    """New tokens for each query after the context (an end-of-sequence token ends a row and is not returned)."""
    if len(sampling) != len(queries):
        raise ValueError(f"One Sampling per query: got {len(sampling)} for {len(queries)} queries.")
    if any(s.max_new_tokens < 1 for s in sampling):
        raise ValueError("max_new_tokens must be at least 1 for every row (nothing to generate otherwise).")
    read = read_queries(lm, context, queries, pad_id)
    check_fits(lm, read.mask.shape[1], 0, max(s.max_new_tokens for s in sampling), "new tokens")
    logits, layers, mask = read.last_logits, read.layers, read.mask
    device = mask.device
    eos = set(eos_token_ids)
    results = [Generation([], LENGTH) for _ in queries]
    active = list(range(len(queries)))  # original index of each row still in the batch
    while active:
        fed, keep = [], []
        for row, index in enumerate(active):
            settings, result = sampling[index], results[index]
            token = _pick(logits[row], settings)
            if settings.logprobs is not None:
                logprobs = F.log_softmax(logits[row].float(), dim=-1)
                result.token_logprobs.append(float(logprobs[token]))
                top = torch.topk(logprobs, settings.logprobs) if settings.logprobs > 0 else None
                result.top_logprobs.append(dict(zip(top.indices.tolist(), top.values.tolist())) if top else {})
            if token in eos:
                result.finish_reason, result.eos_token = EOS, token
                continue
            result.tokens.append(token)
            if settings.on_token is not None:
                settings.on_token(token)
            if settings.stop is not None and settings.stop(result.tokens):
                result.finish_reason = STOP
            elif len(result.tokens) >= settings.max_new_tokens:
                result.finish_reason = LENGTH
            else:
                keep.append(row)
                fed.append(token)
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            layers, mask = [(k[rows], v[rows]) for k, v in layers], mask[rows]
            active = [active[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        output = run_lm(
            lm,
            torch.tensor(fed, dtype=torch.long, device=device).unsqueeze(1),
            mask,
            mask.sum(-1, keepdim=True) - 1,
            layers,
            keep_cache=True,
        )
        logits, layers = output.logits[:, -1].float(), output.layers
    return results
