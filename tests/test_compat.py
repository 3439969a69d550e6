"""What `peft_metal/compat.py` relies on inside transformers: these fail loudly when an upgrade changes it."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_lm
from transformers import DynamicCache

from peft_metal.compat import (
    attention_implementation,
    cache_from_layers,
    cache_kwargs,
    cache_layers,
    causal_lm_output,
    compile_errors,
    custom_attention_mask,
    has_shift_invariant_positions,
    inductor_missing,
    llama_style_parts,
    plain_linear,
    returned_cache,
)


def test_rotary_families_are_shift_invariant_and_gpt2_is_not():
    assert {family: has_shift_invariant_positions(make_lm(family)) for family in FAMILIES} == {
        "llama": True, "gpt2": False, "qwen2": True, "gemma": True,
    }


def test_shifting_all_positions_leaves_a_rotary_model_unchanged():
    """What the PGM pass relies on to put the shots at negative positions: on a rotary model only differences of
    positions matter, so logits are the same at any offset."""
    lm = make_lm("llama")
    ids = torch.arange(5, 25).unsqueeze(0)
    with torch.no_grad():
        plain = lm(input_ids=ids).logits
        shifted = lm(input_ids=ids, position_ids=torch.arange(-20, 0).unsqueeze(0)).logits
    torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=1e-5)


def test_cache_built_from_layers_holds_them_and_extending_it_leaves_them_alone():
    lm = make_lm("llama")
    with torch.no_grad():
        cache = returned_cache(lm(input_ids=torch.arange(5, 12).unsqueeze(0), use_cache=True))
    layers = cache_layers(cache)
    assert len(layers) == lm.config.num_hidden_layers and layers[0][0].shape[2] == 7
    rebuilt = cache_from_layers(layers)
    assert isinstance(rebuilt, DynamicCache) and rebuilt.get_seq_length() == 7
    assert all(torch.equal(k, layer[0]) and torch.equal(v, layer[1]) for (k, v), layer in zip(cache_layers(rebuilt), layers))
    with torch.no_grad():
        lm(input_ids=torch.tensor([[3, 4]]), **cache_kwargs(lm, rebuilt), use_cache=True)
    assert rebuilt.get_seq_length() == 9 and layers[0][0].shape[2] == 7


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_custom_4d_mask_reaches_the_attention_unchanged(implementation):
    """What packed queries rely on: a 4D mask is taken as given. Two sequences packed in one row, each seeing only
    itself, give each one's own hidden states."""
    lm = make_lm("llama")
    lm.set_attn_implementation(implementation)
    first, second = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
    segments = torch.tensor([0, 0, 0, 1, 1])
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    allowed = (segments[:, None] == segments[None, :]) & (positions[0][None, :] <= positions[0][:, None])
    with torch.no_grad():
        packed = lm.model(
            input_ids=torch.cat([first, second], dim=1),
            attention_mask=custom_attention_mask(allowed, torch.float32),
            position_ids=positions,
        ).last_hidden_state
        alone = torch.cat([lm.model(input_ids=ids).last_hidden_state for ids in (first, second)], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_set_lora_enabled_switches_the_tuner_layers_and_leaves_trainability():
    from conftest import make_pgm
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peft_metal.compat import set_lora_enabled

    model = make_pgm("llama", "prefix").train()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    set_lora_enabled(model, True)
    assert layers and all(not m.disable_adapters for m in layers)
    set_lora_enabled(model, False)
    assert all(m.disable_adapters for m in layers)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_add_enum_member_makes_a_full_member():
    from enum import Enum

    from peft_metal.compat import add_enum_member

    class Kind(str, Enum):
        A = "A"

    member = add_enum_member(Kind, "B")
    assert Kind("B") is member and Kind["B"] is member and Kind.B is member and member in list(Kind)
    assert add_enum_member(Kind, "B") is member and isinstance(member, str) and member == "B"


def test_forget_gguf_quantizer_lets_the_model_save(tmp_path):
    from peft_metal.compat import forget_gguf_quantizer

    lm = make_lm("llama")
    lm.hf_quantizer, lm.config.quantization_config = object(), {"quant_method": "gguf"}
    forget_gguf_quantizer(lm)
    assert lm.hf_quantizer is None and not hasattr(lm.config, "quantization_config")
    lm.save_pretrained(tmp_path)


def test_attention_implementation_switches_for_a_while_and_back():
    """Reads `config._attn_implementation` (private in transformers 5): fails loudly if it moves. The switch takes
    effect at once, computes the same logits, and is undone on leaving, also after an error."""
    lm = make_lm("llama")
    before = lm.config._attn_implementation
    other = "eager" if before == "sdpa" else "sdpa"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = lm(ids).logits
        with attention_implementation(lm, other):
            assert lm.config._attn_implementation == other
            torch.testing.assert_close(lm(ids).logits, expected, atol=1e-5, rtol=0)
        assert lm.config._attn_implementation == before
        with pytest.raises(RuntimeError), attention_implementation(lm, other):
            raise RuntimeError("inside")
    assert lm.config._attn_implementation == before


def test_the_head_gets_contiguous_input_and_the_same_logits():
    """`logits_to_keep` slices the hidden states; with the hook the head sees a contiguous tensor (torch's CPU matmul
    copies the whole weight for a non-contiguous 3-D input) and the logits are unchanged. Installing twice is once."""
    from peft_metal.compat import give_the_head_contiguous_input

    lm = make_lm("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    with torch.no_grad():
        expected = lm(ids, logits_to_keep=2).logits
        give_the_head_contiguous_input(lm)
        give_the_head_contiguous_input(lm)
        seen = []
        handle = lm.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        got = lm(ids, logits_to_keep=2).logits
        handle.remove()
    assert len(lm.get_output_embeddings()._forward_pre_hooks) == 1
    assert seen[0].is_contiguous() and seen[0].shape == (2, 2, lm.config.hidden_size)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_the_head_gets_row_major_input_for_one_position_of_one_row():
    """One kept position of a batch of one is "contiguous" to torch (strides of size-1 dimensions are ignored) but
    keeps the sequence's batch stride, with which the CPU matmul still broadcasts the weight: the head must see
    row-major strides, and the same logits."""
    from peft_metal.compat import give_the_head_contiguous_input

    lm = make_lm("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = lm(ids).logits[:, -1:]
        give_the_head_contiguous_input(lm)
        seen = []
        handle = lm.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        got = lm(ids, logits_to_keep=1).logits
        handle.remove()
    assert seen[0].shape == (1, 1, lm.config.hidden_size)
    assert seen[0].stride() == (lm.config.hidden_size, lm.config.hidden_size, 1)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cache_goes_in_and_comes_out_under_the_name_this_transformers_uses(family, recwarn):
    """transformers renamed `past_key_values` to `cache` (the old name warns, then goes): the keyword and the output
    field peft-metal uses must be the current ones, accepted silently by the model, its base model and generate."""
    lm = make_lm(family)
    with torch.no_grad():
        first = returned_cache(lm(input_ids=torch.arange(5, 12).unsqueeze(0), use_cache=True))
        assert isinstance(first, DynamicCache) and first.get_seq_length() == 7
        second = returned_cache(lm.base_model(input_ids=torch.tensor([[3]]), **cache_kwargs(lm.base_model, first), use_cache=True))
        assert second.get_seq_length() == 8
        out = lm.generate(
            input_ids=torch.arange(5, 14).unsqueeze(0), **cache_kwargs(lm, second), max_new_tokens=2, do_sample=False,
            pad_token_id=0,
        )
    assert out.shape == (1, 11)
    assert returned_cache(causal_lm_output(None, torch.zeros(1, 1, 2), second)) is second
    deprecations = [str(w.message) for w in recwarn if "deprecated" in str(w.message)]
    assert not deprecations, deprecations


def test_peft_wrapping_quietly_silences_only_the_checkpointing_rename():
    """PEFT 0.21 reads transformers 5's renamed `is_gradient_checkpointing` whenever it wraps a model; when an upgrade
    stops it (the first half fails), `peft_wrapping_quietly` can go."""
    import warnings

    from peft import get_peft_model

    from peft_metal import MetaLPromptConfig
    from peft_metal.compat import CHECKPOINTING_RENAME_WARNING, peft_wrapping_quietly

    config = MetaLPromptConfig(task_type="CAUSAL_LM", num_prompt_tokens=4, r=4)
    with pytest.warns(FutureWarning, match=CHECKPOINTING_RENAME_WARNING):
        get_peft_model(make_lm("llama"), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with peft_wrapping_quietly():
            get_peft_model(make_lm("llama"), MetaLPromptConfig(task_type="CAUSAL_LM", num_prompt_tokens=4, r=4))
        with pytest.raises(UserWarning), peft_wrapping_quietly():
            warnings.warn("another warning", UserWarning)


def test_llama_style_parts_are_found_on_llama_and_qwen2_only():
    """The compiled graded pass calls these modules itself (tests/test_graded_pass.py checks it against the forward)."""
    for family in ("llama", "qwen2"):
        lm = make_lm(family)
        parts = llama_style_parts(lm)
        assert parts.layers is lm.model.layers and parts.head is lm.lm_head and parts.norm is lm.model.norm
        assert (parts.num_heads, parts.num_kv_heads, parts.head_dim) == (4, 2, 8)
    for family in ("gpt2", "gemma"):
        with pytest.raises(ValueError, match="is not Llama-style"):
            llama_style_parts(make_lm(family))


def test_plain_linear_is_the_frozen_linear_inside_a_lora_layer(pgm_factory):
    pgm = pgm_factory("llama", "prefix")
    wrapped = pgm.get_base_model().model.layers[0].self_attn.q_proj
    assert type(plain_linear(wrapped)) is torch.nn.Linear and plain_linear(wrapped) is wrapped.base_layer
    linear = torch.nn.Linear(2, 2)
    assert plain_linear(linear) is linear


def test_inductor_missing_names_an_absent_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    reason = inductor_missing()
    assert reason is not None and "'no-such-compiler-here' is not there" in reason


def test_compile_errors_are_exception_types():
    assert compile_errors() and all(issubclass(error, Exception) for error in compile_errors())
