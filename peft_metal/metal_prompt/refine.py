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
from .queries import encode_queries
from .reading import forward_with_prompt, model_device
from .template import Shot, ShotTemplate


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
) -> GeneratedPrompt:
    """`steps` Adam steps on -log P_LM(output | prompt, demonstrations, input) over minibatches of `shots`.

    Only the prompt's tensors change (in float32, cast back at the end); the LM is only read.
    """
    if steps < 0 or lr <= 0 or batch_size <= 0:
        raise ValueError(f"steps must be >= 0, lr > 0 and batch_size > 0 (got steps={steps}, lr={lr}, batch_size={batch_size}).")
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
        candidate = replace(prompt, **{name: p.to(dtypes[name]) for name, p in parameters.items()})
        loss = forward_with_prompt(lm, candidate, batch.input_ids, batch.attention_mask, batch.labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, loss.item())
    return replace(prompt, **{name: p.detach().to(dtypes[name]) for name, p in parameters.items()})
