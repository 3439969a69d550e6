"""Queries with their answers as one left-padded batch, labelled on the answers only: what meta-training and prompt
refinement both score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .template import Shot, ShotTemplate


@dataclass
class QueryBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def encode_queries(
    pairs: Sequence[Shot], tokenizer: PreTrainedTokenizerBase, template: ShotTemplate, device: torch.device
) -> QueryBatch:
    """Query + answer per pair; labels only on the answer tokens. Query and answer are tokenized apart, so the
    boundary is exact whatever the tokenizer merges."""
    rows, labels = [], []
    for input_text, output_text in pairs:
        query = tokenizer(template.format_query(input_text), add_special_tokens=False)["input_ids"]
        answer = tokenizer(template.format_answer(output_text), add_special_tokens=False)["input_ids"]
        rows.append(query + answer)
        labels.append([-100] * len(query) + answer)
    width = max(len(row) for row in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    label_ids = torch.tensor([[-100] * (width - len(row)) + row for row in labels], device=device)
    return QueryBatch(input_ids, attention_mask, label_ids)


def answer_tokens(batch: QueryBatch) -> int:
    """The labelled positions a causal LM loss averages over (each label is predicted from the position before)."""
    return int((batch.labels[:, 1:] != -100).sum())


def split_by_tokens(batch: QueryBatch, max_tokens: int) -> list[QueryBatch]:
    """The rows in consecutive groups whose padded size (rows x longest row) stays within `max_tokens` (at least one
    row each), each trimmed to its own longest row: the same rows, read in pieces that bound a graded pass's memory."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    pieces, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and (end + 1 - start) * max(lengths[start : end + 1]) <= max_tokens:
            end += 1
        width = max(lengths[start:end])
        pieces.append(QueryBatch(*(t[start:end, -width:] for t in (batch.input_ids, batch.attention_mask, batch.labels))))
        start = end
    return pieces
