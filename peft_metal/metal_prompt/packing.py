"""An episode's queries read as one packed row instead of a left-padded batch: no work on padding, and the context's
keys/values are read by every query without being repeated per row.

Training scores each query's answer after [prompt][demonstrations][query] (`forward_with_prompt` with
`gradient_from_answers_only`). Packed, the queries' tokens before their answers are read without gradient as one row,
each query's tokens seeing the context and its own earlier tokens only (a block-diagonal causal mask), at the
positions it would have alone; then the answers (with the token before each) are read with gradient as a second row,
each seeing the context, its own query and its own earlier answer tokens. The loss is the same causal-LM loss over
the same answer tokens as the padded batch gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compat import custom_attention_mask
from .queries import QueryBatch


@dataclass(frozen=True)
class PackedQueries:
    """The queries of a batch, each cut where its graded part starts (the position that predicts its first answer
    token), laid end to end: `prefix_*` the parts read without gradient, `graded_*` the rest. Positions count from
    the start of each query (the context's length is added when read); `segments` says which query each token of a
    row belongs to, `targets` the token each graded position predicts (-100 where none: a query's last token)."""

    prefix_ids: torch.Tensor  # 1 x P
    prefix_positions: torch.Tensor  # 1 x P
    prefix_segments: torch.Tensor  # P
    graded_ids: torch.Tensor  # 1 x G
    graded_positions: torch.Tensor  # 1 x G
    graded_segments: torch.Tensor  # G
    targets: torch.Tensor  # 1 x G


def pack_queries(batch: QueryBatch) -> PackedQueries:
    """`batch` (left-padded, labelled on the answers) as packed rows; a query without labels is refused, since it
    would have no graded part."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("pi", "pp", "ps", "gi", "gp", "gs", "t")}
    for index, (ids, mask, labels) in enumerate(zip(batch.input_ids, batch.attention_mask, batch.labels)):
        ids, labels = ids[mask.bool()], labels[mask.bool()]
        labelled = (labels[1:] != -100).nonzero()
        if not len(labelled):
            raise ValueError(f"Query {index} has no labelled answer token: packing needs each query's answer.")
        cut = int(labelled[0])  # this position predicts the first answer token
        positions = torch.arange(len(ids), device=ids.device)
        parts["pi"].append(ids[:cut])
        parts["pp"].append(positions[:cut])
        parts["gi"].append(ids[cut:])
        parts["gp"].append(positions[cut:])
        parts["t"].append(torch.cat([labels[cut + 1 :], labels.new_full((1,), -100)]))
        parts["ps"].append(torch.full((cut,), index, device=ids.device))
        parts["gs"].append(torch.full((len(ids) - cut,), index, device=ids.device))
    row = {name: torch.cat(values) for name, values in parts.items()}
    return PackedQueries(
        prefix_ids=row["pi"].unsqueeze(0),
        prefix_positions=row["pp"].unsqueeze(0),
        prefix_segments=row["ps"],
        graded_ids=row["gi"].unsqueeze(0),
        graded_positions=row["gp"].unsqueeze(0),
        graded_segments=row["gs"],
        targets=row["t"].unsqueeze(0),
    )


def packed_allowed(
    context_length: int,
    key_segments: torch.Tensor,
    key_positions: torch.Tensor,
    query_segments: torch.Tensor,
    query_positions: torch.Tensor,
) -> torch.Tensor:
    """What packed query tokens reading after the context and `key_*` tokens may attend (queries x keys, boolean):
    the context is seen by all; any other key only by the tokens of its own query at or after its position."""
    same_query = query_segments[:, None] == key_segments[None, :]
    not_later = key_positions[0][None, :] <= query_positions[0][:, None]
    context = torch.ones(len(query_segments), context_length, dtype=torch.bool, device=same_query.device)
    return torch.cat([context, same_query & not_later], dim=1)


def packed_mask(
    context_length: int,
    key_segments: torch.Tensor,
    key_positions: torch.Tensor,
    query_segments: torch.Tensor,
    query_positions: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`packed_allowed` as the 4D additive mask transformers' attention takes."""
    allowed = packed_allowed(context_length, key_segments, key_positions, query_segments, query_positions)
    return custom_attention_mask(allowed, dtype)
