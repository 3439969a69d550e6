"""What `peft_metal/compat.py` relies on inside transformers: these fail loudly when an upgrade changes it."""

from __future__ import annotations

import torch
from conftest import FAMILIES, make_lm
from transformers import DynamicCache

from peft_metal.compat import cache_from_layers, cache_layers, has_shift_invariant_positions


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
        cache = lm(input_ids=torch.arange(5, 12).unsqueeze(0), use_cache=True).past_key_values
    layers = cache_layers(cache)
    assert len(layers) == lm.config.num_hidden_layers and layers[0][0].shape[2] == 7
    rebuilt = cache_from_layers(layers)
    assert isinstance(rebuilt, DynamicCache) and rebuilt.get_seq_length() == 7
    assert all(torch.equal(k, layer[0]) and torch.equal(v, layer[1]) for (k, v), layer in zip(cache_layers(rebuilt), layers))
    with torch.no_grad():
        lm(input_ids=torch.tensor([[3, 4]]), past_key_values=rebuilt, use_cache=True)
    assert rebuilt.get_seq_length() == 9 and layers[0][0].shape[2] == 7
