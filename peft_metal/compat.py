"""Every place peft-metal relies on how another library works inside, in one module.

Each function here is covered by `tests/test_compat.py`, which fails loudly when an upgrade changes what it relies on.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import sysconfig
import warnings
from contextlib import contextmanager
from enum import Enum
from typing import Any, Iterator, NamedTuple, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# RoPE variants whose rotation of a position does not depend on the sequence length, so attention scores depend
# only on position differences and a block of tokens may be placed at any offset (negative ones included).
SHIFT_INVARIANT_ROPE_TYPES = ("default", "linear", "llama3")


def has_shift_invariant_positions(lm: PreTrainedModel) -> bool:
    """Whether `lm` encodes positions only by a fixed rotary embedding (Llama, Qwen2, Gemma, SmolLM2, ...).

    transformers 5 keeps the rotary settings in `config.rope_parameters`; models with learned absolute positions
    (GPT-2) have none.
    """
    config = lm.config.get_text_config(decoder=True)
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:
        return False
    return rope["rope_type"] in SHIFT_INVARIANT_ROPE_TYPES


@functools.lru_cache(maxsize=None)
def _cache_argument(forward_owner: type) -> str:
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`cache` as the keyword `model.forward` (and so `model.generate`) takes it: `cache` in newer transformers 5
    releases (5.24 here, where `past_key_values` still works but warns, and is removed in 5.40), else
    `past_key_values`."""
    return {_cache_argument(type(model)): cache}


# The field model outputs hold their cache in: `cache` in newer transformers 5 releases (where `past_key_values` is a
# deprecated alias that warns), `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def returned_cache(outputs: Any) -> Any:
    """The cache a forward returned, read from the field this transformers keeps it in."""
    return getattr(outputs, _CACHE_FIELD)


def causal_lm_output(loss: Any, logits: torch.Tensor, cache: Any) -> CausalLMOutputWithPast:
    """transformers' causal-LM output, its cache in the field this transformers keeps it in."""
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


def cache_from_layers(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A new `DynamicCache` holding the given per-layer (keys, values); extending it never touches the given tensors.

    `ddp_cache_data` is the only constructor argument of transformers 5's DynamicCache that takes ready tensors (it
    concatenates them into each layer, keeping their autograd graph).
    """
    return DynamicCache(ddp_cache_data=layers)


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) a `DynamicCache` holds (batch x kv-heads x length x head-dim each)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def expand_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> DynamicCache:
    """A new cache whose batch dimension repeats batch-1 keys/values; the source tensors are only read."""
    return cache_from_layers(
        [(k.expand(batch_size, *k.shape[1:]), v.expand(batch_size, *v.shape[1:])) for k, v in layers]
    )


def custom_attention_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (queries x keys) boolean matrix of what may be attended as the 1 x 1 x queries x keys additive mask that
    transformers 5's mask creation passes through unchanged ("an already prepared 4D mask") to every attention
    implementation (eager adds it to the scores, SDPA takes it as its float mask)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def current_attention_implementation(lm: PreTrainedModel) -> str:
    """The attention implementation `lm` runs with now; only readable from a private config attribute."""
    return lm.config._attn_implementation


@contextmanager
def attention_implementation(lm: PreTrainedModel, implementation: Optional[str]) -> Iterator[None]:
    """Run `lm` with another attention implementation for a while ("eager", "sdpa", ...; None: keep its own).

    transformers 5 looks the implementation up in `config._attn_implementation` at every attention call, so
    `set_attn_implementation` takes effect at once and costs well under a millisecond.
    """
    previous = current_attention_implementation(lm)
    if implementation is None or previous == implementation:
        yield
        return
    lm.set_attn_implementation(implementation)
    try:
        yield
    finally:
        lm.set_attn_implementation(previous)


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every PEFT tuner layer of `model` on or off, leaving the adapters' trainability alone.

    `BaseTunerLayer.enable_adapters(False)` would also set `requires_grad=False` on the LoRA weights, which breaks
    meta-training (the PGM's graph is built with LoRA on, the loss with LoRA off); the flag it reads is toggled
    instead.
    """
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module._disable_adapters = not enabled


# transformers 5 renamed `is_gradient_checkpointing` to `is_activation_checkpointing` and warns on the old name, which
# PEFT 0.21 reads whenever it wraps a model (`PeftModel.__init__`): a FutureWarning at every get_peft_model and
# PeftModel.from_pretrained that tells the user of a PGM nothing they can act on.
CHECKPOINTING_RENAME_WARNING = "`is_gradient_checkpointing` is deprecated"


@contextmanager
def peft_wrapping_quietly() -> Iterator[None]:
    """Inside: PEFT wraps a model without transformers 5's warning about the renamed checkpointing flag (only that one
    warning is silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"{CHECKPOINTING_RENAME_WARNING}.*", category=FutureWarning)
        yield


def add_enum_member(enum: type[Enum], name: str) -> Enum:
    """Add `name` (value `name`) to a `str` enum the way the enum machinery would have at class creation; PEFT has no
    public way to add a `PeftType`."""
    if name in enum.__members__:
        return enum[name]
    member = str.__new__(enum, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum
    member.__init__(name)
    type.__setattr__(enum, name, member)
    enum._member_map_[name] = member
    enum._value2member_map_[name] = member
    enum._member_names_.append(name)
    return member


def forget_gguf_quantizer(model: Any) -> None:
    """A model de-quantized from a GGUF file on load keeps a quantizer marker that forbids `save_pretrained`; the
    weights are plain floats by then, so the marker (and the config's note of it) is dropped."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _row_major_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    hidden = args[0]
    # Not `.contiguous()`: a slice of one position of one row (batch 1, `logits_to_keep=1`) already counts as
    # contiguous, since strides of size-1 dimensions are ignored, yet its batch stride still makes the matmul broadcast.
    if hidden.stride() != _row_major_strides(tuple(hidden.shape)):
        hidden = hidden.clone(memory_format=torch.contiguous_format)
    return (hidden, *args[1:])


def give_the_head_contiguous_input(lm: PreTrainedModel) -> None:
    """Hand the LM head a contiguous input, once per model.

    transformers' `logits_to_keep` gives the head a slice of the hidden states (`hidden[:, -k:]`), which is not
    contiguous; torch's CPU matmul then broadcasts the head's weight to the batch and copies it (for SmolLM2's
    49152x576 head, 279 ms at batch 4 against 4 ms on a contiguous copy of the slice: experiments/head_matmul.py).
    Every read that keeps one position's logits, and meta-training's labelled-only logits, pays that copy otherwise.
    The input is copied whenever its strides are not the row-major ones, also when torch already calls it contiguous
    (one position of a batch of one: 78 ms against 2.5 ms, `experiments/head_matmul.py --batch 1 --keep 1`).
    """
    head = lm.get_output_embeddings()
    if head is None or getattr(head, "_peft_metal_contiguous_input", False):
        return
    head.register_forward_pre_hook(_contiguous_input)
    head._peft_metal_contiguous_input = True


# Decoders whose layers are Llama's: pre-norm RMSNorm, rotary queries and keys, grouped-query attention without a
# sliding window or per-head norms, a gated MLP. Qwen2 only adds biases to the projections, which its Linears hold.
LLAMA_STYLE_MODEL_TYPES = ("llama", "qwen2")
_LLAMA_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_LLAMA_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


class DecoderParts(NamedTuple):
    """The modules of a Llama-style causal LM that a pass written as plain tensor code (inference/graded_pass.py)
    calls in turn, with the attention shapes it needs."""

    layers: nn.ModuleList
    rotary: nn.Module  # (hidden, position_ids) -> (cos, sin), each rows x positions x head_dim
    norm: nn.Module
    head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int


def plain_linear(module: nn.Module) -> nn.Module:
    """The frozen Linear inside a PEFT tuner layer (the module itself when it is not wrapped): the LM's own weights,
    as the LM reads with LoRA off."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def llama_style_parts(lm: PreTrainedModel) -> DecoderParts:
    """The decoder modules of `lm` (a Llama or Qwen2 causal LM), read from their transformers 5 attribute names;
    a ValueError names what is missing for any other architecture."""
    config = lm.config.get_text_config(decoder=True)
    if config.model_type not in LLAMA_STYLE_MODEL_TYPES:
        raise ValueError(f"a {config.model_type!r} decoder is not Llama-style (supported: {LLAMA_STYLE_MODEL_TYPES})")
    if getattr(config, "use_sliding_window", False) or getattr(config, "layer_types", None) and any(
        kind != "full_attention" for kind in config.layer_types
    ):
        raise ValueError("this decoder has sliding-window layers, which the graded pass does not model")
    decoder = lm.get_decoder()
    for name in ("layers", "rotary_emb", "norm"):
        if not hasattr(decoder, name):
            raise ValueError(f"the decoder has no {name!r}: this transformers names a Llama decoder's parts differently")
    for layer in decoder.layers:
        missing = [n for n in _LLAMA_LAYER_PARTS if not hasattr(layer, n)]
        missing += [n for n in _LLAMA_ATTENTION_PARTS if not hasattr(layer.self_attn, n)]
        if missing or hasattr(layer.self_attn, "q_norm"):
            raise ValueError(f"a decoder layer is not Llama's (missing {missing} or has per-head norms)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return DecoderParts(
        decoder.layers, decoder.rotary_emb, decoder.norm, lm.get_output_embeddings(), config.num_attention_heads,
        kv_heads, head_dim,
    )


def inductor_missing() -> Optional[str]:
    """Why inductor cannot compile on this machine (it needs its own module and a C++ compiler for CPU kernels, and
    the Python headers), or None."""
    try:
        import torch._inductor  # noqa: F401  (private, but the only way to ask whether this torch has it)
    except ImportError as error:
        return f"this torch has no inductor ({error})"
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"inductor needs a C++ compiler on the PATH and {compiler!r} is not there (set CXX)"
    include = sysconfig.get_paths().get("include")
    if not include or not os.path.isfile(os.path.join(include, "Python.h")):
        return f"inductor needs Python's headers and {include}/Python.h is missing (install python3-dev)"
    return None


def compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions `torch.compile` raises when its backend fails on a graph (dynamo keeps them in a private module)."""
    from torch._dynamo import exc

    return (exc.BackendCompilerFailed, exc.InternalTorchDynamoError, exc.Unsupported)
