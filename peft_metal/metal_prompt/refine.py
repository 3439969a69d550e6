"""Gradient refinement of a generated prompt: prompt tuning on the task's own shots, started from the PGM's prompt.

The PGM gives a good start in one forward pass; a few steps of prompt tuning on the same shots can then fit the task
more closely. What is tuned is the prompt itself, as the LM reads it: the embeddings (weighted_sum, hidden_state), every
layer's keys and values (prefix), or, for a discrete prompt, the embeddings of its tokens. A refined discrete prompt
therefore keeps its tokens (and `text`) for reference but is read as its tuned embeddings: it is a soft prompt.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..designs import get_design
from .prompt import GeneratedPrompt
from .queries import answer_tokens, encode_queries, split_by_tokens
from .reading import forward_with_prompt, model_device
from .template import Shot, ShotTemplate

# A step's minibatch is read in pieces of at most this many (padded) tokens, gradients summed: the same step, with the
# memory of a graded pass bounded (8 reading-comprehension shots of some 1,500 tokens in one pass took over 15 GB).
MAX_BATCH_TOKENS = 2048


def refine(
    lm: PreTrainedModel,
    prompt: GeneratedPrompt,
    shots: list[Shot],
    tokenizer: PreTrainedTokenizerBase,
    template: ShotTemplate,
    steps: int = 20,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    progress: Optional[Callable[[int, float], None]] = None,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> GeneratedPrompt:
    """`steps` Adam steps on -log P_LM(output | prompt, demonstrations, input) over minibatches of `shots`.

    Only the prompt's tensors change (in float32, cast back at the end); the LM is only read.
    """
    if steps < 0 or lr <= 0 or batch_size <= 0 or max_batch_tokens <= 0:
        raise ValueError(
            f"steps must be >= 0, lr > 0, batch_size > 0 and max_batch_tokens > 0 (got steps={steps}, lr={lr}, "
            f"batch_size={batch_size}, max_batch_tokens={max_batch_tokens})."
        )
    prompt = prompt.detach()
    start = get_design(prompt.design).tunable_payload(prompt, lm)
    dtypes = {name: tensor.dtype for name, tensor in start.items()}
    parameters = {name: nn.Parameter(tensor.detach().float().clone()) for name, tensor in start.items()}
    optimizer = torch.optim.Adam(parameters.values(), lr=lr)
    device = model_device(lm)
    order = random.Random(seed)
    for step in range(steps):
        batch_shots = order.sample(shots, min(batch_size, len(shots)))
        batch = encode_queries(batch_shots, tokenizer, template, device)
        total = answer_tokens(batch)
        optimizer.zero_grad()
        step_loss = 0.0
        for piece in split_by_tokens(batch, max_batch_tokens):
            # each piece's mean loss weighted by its share of the answer tokens: the minibatch's mean, summed in parts
            candidate = replace(prompt, **{name: p.to(dtypes[name]) for name, p in parameters.items()})
            outputs = forward_with_prompt(lm, candidate, piece.input_ids, piece.attention_mask, piece.labels)
            loss = outputs.loss * (answer_tokens(piece) / total)
            loss.backward()
            step_loss += loss.item()
        optimizer.step()
        if progress is not None:
            progress(step, step_loss)
    return replace(prompt, **{name: p.detach().to(dtypes[name]) for name, p in parameters.items()})
