"""The PGM: LoRA only while generating the prompt, frozen single-copy base weights, and the trainable padding."""

from __future__ import annotations

import pytest
import torch
from conftest import DESIGNS, FAMILIES, QUERIES, SCOPES, SHOTS, K, left_padded, make_lm, make_pgm, padding_module
from peft.tuners.tuners_utils import BaseTunerLayer

from peft_metal.compat import returned_cache
from peft_metal.metal_prompt.layer import TrainablePadding


def zero_lora_b(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()


def payload(prompt) -> torch.Tensor:
    if prompt.design == "prefix":
        return torch.cat([prompt.keys.flatten(), prompt.values.flatten()])
    return prompt.embeds


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_forward_and_generate_are_the_base_lm(family, tok):
    """Without a prompt the PeftModel is exactly the base LM, even with non-zero LoRA."""
    model = make_pgm(family, "prefix")
    reference = make_lm(family)
    batch = left_padded(tok, QUERIES)
    with torch.no_grad():
        got = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        want = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # and also after a prompt was generated (LoRA must be switched off again)
    model.generate_prompt(SHOTS, tokenizer=tok)
    with torch.no_grad():
        again = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        gen = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=3, do_sample=False)
        ref_gen = reference.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=3, do_sample=False
        )
    torch.testing.assert_close(again, want, atol=1e-6, rtol=0)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_is_on_only_inside_generate_prompt(family, tok):
    model = make_pgm(family, "prefix")
    layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    seen: list[bool] = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(module.disable_adapters))
    try:
        model.generate_prompt(SHOTS, tokenizer=tok)
        assert seen and not any(seen), "LoRA was off during the PGM pass"
        seen.clear()
        prompt = model.generate_prompt(SHOTS, tokenizer=tok)
        seen.clear()
        with torch.no_grad():
            model(prompt=prompt, input_ids=tok(QUERIES[:1], return_tensors="pt").input_ids)
            model.generate(prompt=prompt, input_ids=tok(QUERIES[:1], return_tensors="pt").input_ids, max_new_tokens=2)
        assert seen and all(seen), "LoRA was on while the LM read the prompt"
    finally:
        handle.remove()
    # an exception inside the PGM pass must not leave LoRA switched on
    with pytest.raises(ValueError):
        model.generate_prompt([("x" * 300, "y")], tokenizer=tok)
    assert all(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_changes_the_prompt(family, design, scope, tok):
    """With init_lora_weights=False the prompt differs from the one a PGM with zero LoRA B (no LoRA effect) makes.

    In both LoRA scopes a PGM with zero LoRA B writes exactly what the frozen LM computes at the padding after reading
    the shots (shots at positions -len(XP)..-1 on rotary models, so the padding sits at 0..K-1)."""
    with_lora = make_pgm(family, design, lora_scope=scope)
    without = make_pgm(family, design, lora_scope=scope)
    zero_lora_b(without)
    a = with_lora.generate_prompt(SHOTS, tokenizer=tok)
    b = without.generate_prompt(SHOTS, tokenizer=tok)
    if design == "discrete":
        # ids can coincide by chance; compare the PGM's logits at the padding instead
        ids = torch.tensor(tok(SHOTS[0][0]).input_ids)
        with torch.no_grad():
            a_hidden = with_lora.base_model._run_pgm(ids, False).hidden_states
            b_hidden = without.base_model._run_pgm(ids, False).hidden_states
        assert (a_hidden - b_hidden).abs().max() > 1e-3
    else:
        assert (payload(a) - payload(b)).abs().max() > 1e-4
    # with LoRA B zero the prompt is what the frozen LM itself writes at the padding
    reference = make_lm(family)
    ids = torch.tensor(tok("Input: good movie\nOutput: positive\n\n").input_ids)
    with torch.no_grad():
        embeds = torch.cat([reference.get_input_embeddings()(ids), padding_module(without)()]).unsqueeze(0)
        start = -len(ids) if family != "gpt2" else 0
        positions = torch.arange(start, start + embeds.shape[1]).unsqueeze(0)
        out = reference(inputs_embeds=embeds, position_ids=positions, use_cache=True, output_hidden_states=True)
    one_shot = without.generate_prompt(SHOTS[:1], tokenizer=tok)
    if design == "hidden_state":
        logits = reference.get_output_embeddings()(one_shot.embeds)
        torch.testing.assert_close(logits, out.logits[0, -K:], atol=1e-5, rtol=0)
    elif design == "discrete":
        assert torch.equal(one_shot.token_ids, out.logits[0, -K:].argmax(-1))
    elif design == "prefix":
        torch.testing.assert_close(one_shot.keys[0], returned_cache(out).layers[0].keys[0, :, -K:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_base_weights_frozen_and_shared(family):
    lm = make_lm(family)
    pointers = {name: p.data_ptr() for name, p in lm.named_parameters()}
    numel = sum(p.numel() for p in lm.parameters())
    embedding_ptr = lm.get_input_embeddings().weight.data_ptr()
    model = make_pgm(family, "prefix", lm=lm)
    base = model.get_base_model()
    assert base is lm
    assert base.get_input_embeddings().weight.data_ptr() == embedding_ptr
    base_params = [(n, p) for n, p in model.named_parameters() if "lora_" not in n and "metal_padding" not in n]
    assert sum(p.numel() for _, p in base_params) == numel, "base weights were copied"
    assert {p.data_ptr() for _, p in base_params} == set(pointers.values())
    assert not any(p.requires_grad for _, p in base_params)
    # train mode does not unfreeze them
    model.train()
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "metal_padding" not in n)


# ---------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("reparameterization", ["lstm", "mlp", "none"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_reparameterizations_run(family, reparameterization, tok):
    model = make_pgm(family, "hidden_state", padding_reparameterization=reparameterization, padding_hidden_size=16)
    padding = padding_module(model)
    assert isinstance(padding, TrainablePadding) and padding.reparameterization == reparameterization
    out = padding()
    hidden = model.get_base_model().get_input_embeddings().weight.shape[1]
    assert out.shape == (K, hidden)
    # the head starts at zero: the padding is the raw embeddings, which are real token embeddings
    torch.testing.assert_close(out, padding.embedding, atol=0, rtol=0)
    table = model.get_base_model().get_input_embeddings().weight
    assert all(((table - row).abs().sum(-1) == 0).any() for row in padding.embedding.detach())
    if reparameterization != "none":
        with torch.no_grad():
            padding.head[-1].bias.fill_(0.5)
        padding.train()
        assert not torch.allclose(padding(), padding.embedding)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    assert prompt.embeds.shape == (K, hidden)
    assert torch.isfinite(prompt.embeds).all()


def test_padding_init_is_reproducible():
    a = padding_module(make_pgm("llama", "prefix"))
    b = padding_module(make_pgm("llama", "prefix"))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("reparameterization", ["lstm", "mlp", "none"])
def test_padding_cache(reparameterization):
    model = make_pgm("llama", "prefix", padding_reparameterization=reparameterization)
    padding = padding_module(model)
    padding.eval()
    with torch.no_grad():
        padding()
        first = padding()
        second = padding()
    assert second is first, "not cached in eval + no_grad"
    # with grad enabled nothing is cached and the result carries the graph
    with torch.enable_grad():
        grad_out = padding()
    assert grad_out is not first and grad_out.requires_grad

    # .train() drops the cache, and train mode never returns the cached tensor
    padding.train()
    with torch.no_grad():
        in_train = padding().clone()
        assert padding() is not first
        padding.embedding.add_(0.25)  # as an optimizer step would: train mode must see it at once
        torch.testing.assert_close(padding(), in_train + 0.25, atol=1e-5, rtol=0)
        padding.embedding.sub_(0.25)
    padding.eval()
    with torch.no_grad():
        fresh = padding()
    assert fresh is not first
    torch.testing.assert_close(fresh, first)
    fresh = fresh.clone()

    # load_state_dict drops the cache, and the new weights are used
    state = {k: v.clone() for k, v in padding.state_dict().items()}
    state["embedding"] += 1.0
    padding.load_state_dict(state)
    with torch.no_grad():
        after_load = padding()
    torch.testing.assert_close(after_load, fresh + 1.0, atol=1e-5, rtol=0)

    # the same through the whole model's load_state_dict
    with torch.no_grad():
        cached = padding()
        assert padding() is cached
    model.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert padding() is not cached


@pytest.mark.parametrize("reparameterization", ["lstm", "mlp", "none"])
def test_padding_first_no_grad_call_returns_the_cached_tensor(reparameterization):
    """Computed once: the very first eval/no_grad call already returns the tensor later calls return."""
    padding = padding_module(make_pgm("llama", "prefix", padding_reparameterization=reparameterization)).eval()
    with torch.no_grad():
        first = padding()
        second = padding()
    assert not first.requires_grad, "eval/no_grad padding is the trainable Parameter itself"
    assert second is first


def test_padding_cache_dropped_by_eval_switch_on_model(tok):
    """model.train() on the PeftModel reaches the padding (it is a registered submodule)."""
    model = make_pgm("llama", "hidden_state")
    padding = padding_module(model)
    with torch.no_grad():
        padding()
        cached = padding()
        assert padding() is cached
    model.train()
    assert padding.training
    model.eval()
    with torch.no_grad():
        assert padding() is not cached


def test_padding_rejects_unknown_reparameterization():
    with pytest.raises(ValueError, match="reparameterization"):
        TrainablePadding(3, torch.zeros(3, 8), "gru")


@pytest.mark.parametrize(
    ("operation", "args"),
    [("merge_and_unload", ()), ("unload", ()), ("merge_adapter", ()), ("add_weighted_adapter", (["default"], [1.0], "mix"))],
)
def test_lora_operations_that_would_break_the_pgm_are_refused(operation, args):
    """Folding LoRA into the LM (it must stay frozen: one copy serves as LM and PGM) or dropping the padding would
    silently break the PGM: PEFT's entry points raise a clear error instead, and leave the model as it was."""
    model = make_pgm("llama", "prefix")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match=f"{operation} is not supported for a MetaL-Prompt PGM"):
        getattr(model, operation)(*args)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_remove_pgm_gives_the_untouched_lm_back():
    model = make_pgm("llama", "prefix")
    reference = make_lm("llama")
    lm = model.base_model.remove_pgm()
    assert not any(isinstance(m, BaseTunerLayer) for m in lm.modules())
    assert all(torch.equal(p, q) for p, q in zip(lm.parameters(), reference.parameters()))
    again = make_pgm("llama", "prefix", lm=lm)  # the same LM object takes a new PGM
    assert again.base_model.metal_padding["default"] is not None


def test_padding_can_start_from_given_tokens():
    model = make_pgm("llama", "prefix", padding_init_token_ids=[10, 11], padding_reparameterization="none")
    table = model.get_base_model().get_input_embeddings().weight
    torch.testing.assert_close(padding_module(model)(), table[torch.tensor([10, 11, 10, 11])])
    with pytest.raises(TypeError, match="padding_init_token_ids"):
        make_pgm("llama", "prefix", padding_init_token_ids=["a"])
    with pytest.raises(ValueError, match="beyond the vocabulary"):
        make_pgm("llama", "prefix", padding_init_token_ids=[10_000])
