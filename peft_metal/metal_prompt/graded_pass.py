"""The LM's graded pass over a few positions (meta-training's answers) after per-layer keys/values, as plain tensor
code that `torch.compile` (inductor) can compile once per bucket of lengths.

transformers' forward takes the context as a `DynamicCache`, a Python object dynamo guards on and recompiled for
(research log, 2026-11-22). Here the context is a list of (keys, values) tensors, each layer attends over them
concatenated with its own keys/values, and lengths are padded up to fixed sizes (`buckets` for the keys before the
graded positions, powers of two for the graded positions), so a run compiles a few graphs and then reuses them.
Eager, it is the same computation as the LM's forward (tests/test_graded_pass.py); compiled, the same within bf16's
tolerance. Llama-style decoders only (`compat.llama_style_parts`); meta-training falls back to transformers' forward,
with one logged line, for any other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..compat import DecoderParts, compile_errors, inductor_missing, llama_style_parts, plain_linear

logger = logging.getLogger(__name__)

# The keys before the graded positions are padded up to one of these lengths (prompt, demonstrations and the query
# tokens read without gradient): a few graphs cover every episode up to a context of 8,192.
DEFAULT_BUCKETS = (256, 512, 1024, 2048, 4096, 8192)
SMALLEST_GRADED_BUCKET = 8


class BucketTooSmallError(ValueError):
    """An episode needs more keys than the largest bucket holds."""


def check_buckets(buckets: Sequence[int]) -> None:
    if not buckets or any(size <= 0 for size in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"graded_pass_buckets must be positive lengths in increasing order, got {list(buckets)}.")


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` keys; an error naming both numbers when none does."""
    for size in buckets:
        if size >= length:
            return size
    raise BucketTooSmallError(
        f"the graded pass reads {length} keys, more than the largest bucket, {max(buckets)}: add a bucket of at least "
        f"{length} to graded_pass_buckets."
    )


def graded_bucket_for(length: int) -> int:
    """Graded positions are few (an episode's answers): padded to the next power of two, at least 8."""
    size = SMALLEST_GRADED_BUCKET
    while size < length:
        size *= 2
    return size


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def read_after_layers(
    parts: DecoderParts,
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits at every one of `inputs_embeds`' positions (rows x graded x hidden) after each layer's context
    `layers` (rows x kv-heads x keys x head-dim); `attention_mask` is additive, rows x 1 x graded x (keys + graded)."""
    hidden = inputs_embeds
    rows, length, _ = hidden.shape
    cos, sin = parts.rotary(hidden, position_ids)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for layer, (context_keys, context_values) in zip(parts.layers, layers):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        queries = plain_linear(attention.q_proj)(normed).view(rows, length, parts.num_heads, parts.head_dim).transpose(1, 2)
        keys = plain_linear(attention.k_proj)(normed).view(rows, length, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
        values = plain_linear(attention.v_proj)(normed).view(rows, length, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
        queries = queries * cos + _rotate_half(queries) * sin
        keys = keys * cos + _rotate_half(keys) * sin
        attended = F.scaled_dot_product_attention(
            queries,
            torch.cat([context_keys, keys], dim=2),
            torch.cat([context_values, values], dim=2),
            attn_mask=attention_mask,
            enable_gqa=parts.num_heads != parts.num_kv_heads,
        )
        hidden = hidden + plain_linear(attention.o_proj)(attended.transpose(1, 2).reshape(rows, length, -1))
        mlp = layer.mlp
        normed = layer.post_attention_layernorm(hidden)
        gated = mlp.act_fn(plain_linear(mlp.gate_proj)(normed)) * plain_linear(mlp.up_proj)(normed)
        hidden = hidden + plain_linear(mlp.down_proj)(gated)
    return parts.head(parts.norm(hidden))


class GradedPass:
    """`forward_with_prompt`'s last read (the graded positions after the context's keys/values) in bucketed shapes,
    eager or compiled. Meta-training builds one per run; `compiled=False` runs the same code uncompiled."""

    def __init__(self, lm: PreTrainedModel, buckets: Sequence[int] = DEFAULT_BUCKETS, compiled: bool = True) -> None:
        check_buckets(buckets)
        self.parts = llama_style_parts(lm)
        self.buckets = tuple(buckets)
        self.compiled = compiled
        # (rows, keys, graded) of every bucketed call so far: each is one compiled graph (one per grad mode).
        self.shapes: set[tuple[int, int, int]] = set()
        self._read: Callable[..., torch.Tensor] = (
            torch.compile(read_after_layers, dynamic=False) if compiled else read_after_layers
        )

    def __call__(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        inputs_embeds: torch.Tensor,
        allowed: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (rows x graded x vocab) of the LM reading `inputs_embeds` at `position_ids` after `layers`;
        `allowed` (rows x graded x (keys + graded), boolean) says what each graded position may attend."""
        rows, graded = inputs_embeds.shape[:2]
        context = layers[0][0].shape[2]
        keys, width = bucket_for(context, self.buckets), graded_bucket_for(graded)
        padded_layers = [
            (F.pad(k, (0, 0, 0, keys - context)).expand(rows, -1, -1, -1),
             F.pad(v, (0, 0, 0, keys - context)).expand(rows, -1, -1, -1))
            for k, v in layers
        ]
        embeds = F.pad(inputs_embeds, (0, 0, 0, width - graded))
        positions = F.pad(position_ids, (0, width - graded))
        mask = _bucketed_mask(allowed, context, keys, width, embeds.dtype)
        self.shapes.add((rows, keys, width))
        try:
            logits = self._read(self.parts, padded_layers, embeds, positions, mask)
        except compile_errors() as error:
            logger.warning("compile_graded_pass: inductor failed on a graph (%s); the graded pass runs eager from here.", error)
            self._read, self.compiled = read_after_layers, False
            logits = self._read(self.parts, padded_layers, embeds, positions, mask)
        return logits[:, :graded]


def causal_allowed(attention_mask: torch.Tensor, context: int) -> torch.Tensor:
    """What each graded position of a left-padded batch may attend (rows x graded x (context + graded)): the real
    context tokens, and the real graded positions up to itself; `attention_mask` covers both."""
    graded = attention_mask.shape[1] - context
    allowed = attention_mask.bool()[:, None, :].repeat(1, graded, 1)
    allowed[:, :, context:] &= torch.ones(graded, graded, dtype=torch.bool, device=allowed.device).tril()
    return allowed


def _bucketed_mask(allowed: torch.Tensor, context: int, keys: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of the bucketed pass (rows x 1 x width x (keys + width)): `allowed` moved into the padded
    layout; padded keys are never seen, and a padded graded position sees only itself."""
    rows, graded = allowed.shape[:2]
    bucketed = torch.zeros(rows, width, keys + width, dtype=torch.bool, device=allowed.device)
    bucketed[:, :graded, :context] = allowed[:, :, :context]
    bucketed[:, :graded, keys : keys + graded] = allowed[:, :, context:]
    bucketed[:, graded:, keys + graded :] = torch.eye(width - graded, dtype=torch.bool, device=allowed.device)
    additive = torch.zeros(bucketed.shape, dtype=dtype, device=allowed.device).masked_fill_(~bucketed, torch.finfo(dtype).min)
    return additive.unsqueeze(1)


def why_not_compiled(lm: PreTrainedModel, precision: str) -> Optional[str]:
    """Why meta-training's graded pass cannot be compiled for `lm` on this machine (None: it can)."""
    if precision != "bf16":
        return "this CPU has no bf16 hardware (AMX or AVX512-BF16), so the frozen LM runs in fp32"
    try:
        llama_style_parts(lm)
    except ValueError as error:
        return str(error)
    return inductor_missing()
