"""Meta-training: a loss on the LM reading a train-mode prompt trains LoRA and the padding, never the base."""

from __future__ import annotations

import pytest
import torch
from conftest import DESIGNS, FAMILIES, QUERIES, SCOPES, SHOTS, K, left_padded, make_pgm


def is_adapter(name: str) -> bool:
    return "lora_" in name or "metal_padding" in name


def train_step(model, tok, num_demonstrations=0):
    model.train()
    model.zero_grad(set_to_none=True)
    batch = left_padded(tok, QUERIES)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=num_demonstrations)
    loss = model(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    loss.backward()
    return prompt, loss


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_lora_and_padding_only(family, design, scope, tok):
    model = make_pgm(family, design, lora_scope=scope)
    _, loss = train_step(model, tok, num_demonstrations=1)
    assert torch.isfinite(loss)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    padding = {n: p for n, p in model.named_parameters() if "metal_padding" in n}
    assert lora and padding
    if design == "prefix":
        # the prefix is the keys/values of every layer: the last layer's query projection cannot influence it
        last = model.get_base_model().config.num_hidden_layers - 1 if family != "gpt2" else None
        lora = {n: p for n, p in lora.items() if last is None or f"layers.{last}.self_attn.q_proj" not in n}
    assert all(p.grad is not None for p in lora.values()), [n for n, p in lora.items() if p.grad is None]
    assert all(p.grad is not None for p in padding.values()), [n for n, p in padding.items() if p.grad is None]
    assert any(p.grad.abs().sum() > 0 for p in lora.values()), "all LoRA gradients are zero"
    embedding_grad = next(p.grad for n, p in padding.items() if n.endswith("embedding"))
    assert embedding_grad.abs().sum() > 0, "the padding embeddings got a zero gradient"
    base = [(n, p) for n, p in model.named_parameters() if not is_adapter(n)]
    assert base and all(p.grad is None for _, p in base), [n for n, p in base if p.grad is not None][:3]


@pytest.mark.parametrize("design", DESIGNS)
def test_default_lora_init_still_trains(design, tok):
    """PEFT's default init (B = 0): lora_B still gets a gradient, so training can start."""
    model = make_pgm("llama", design, init_lora_weights=True)
    train_step(model, tok)
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_discrete_train_prompt_is_straight_through(family, tok):
    model = make_pgm(family, "discrete").train()
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    assert prompt.embeds is not None and prompt.embeds.requires_grad
    table = model.get_base_model().get_input_embeddings().weight
    # forward value: exactly the embeddings of the sampled tokens
    torch.testing.assert_close(prompt.embeds.detach(), table[prompt.token_ids].detach(), atol=1e-6, rtol=0)
    assert prompt.token_ids.shape == (K,)
    # eval-mode prompts carry no embeds and no graph
    model.eval()
    eval_prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    assert eval_prompt.embeds is None


@pytest.mark.parametrize("design", DESIGNS)
def test_train_prompt_keeps_graph_and_detach_drops_it(design, tok):
    model = make_pgm("qwen2", design).train()
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    tensor = prompt.keys if design == "prefix" else prompt.embeds
    assert tensor.requires_grad
    detached = prompt.detach()
    assert not any(t.requires_grad for t in (detached.keys, detached.values, detached.embeds) if t is not None)


@pytest.mark.parametrize("design", DESIGNS)
def test_eval_no_grad_prompt_has_no_graph(design, tok):
    model = make_pgm("llama", design)
    with torch.no_grad():
        prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    tensors = [t for t in (prompt.embeds, prompt.keys, prompt.values) if t is not None]
    assert not any(t.requires_grad for t in tensors)


@pytest.mark.parametrize("design", DESIGNS)
def test_a_training_step_lowers_the_loss(design, tok):
    """Gradients point the right way: one small SGD step on the PGM lowers the same loss."""
    model = make_pgm("llama", design, padding_reparameterization="none")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = left_padded(tok, QUERIES)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)

    def loss_now():
        torch.manual_seed(0)  # same Gumbel noise for the discrete design
        prompt = model.generate_prompt(SHOTS, tokenizer=tok)
        return model(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)
    before = loss_now()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_now()
    if design == "discrete":
        assert after <= before + 1e-6  # may not move if the sampled tokens do not change
    else:
        assert after < before


@pytest.mark.parametrize("design", DESIGNS)
def test_gradient_checkpointing_is_refused_clearly(design, tok):
    """Checkpointing would recompute the PGM pass during backward, after LoRA was switched off again: refuse it with
    a message that says how to turn it off, instead of training on wrong gradients."""
    model = make_pgm("llama", design)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        model.generate_prompt(SHOTS, tokenizer=tok)
    model.eval()
    with torch.no_grad():
        assert model.generate_prompt(SHOTS, tokenizer=tok).design == design


def answer_gradients(model, tok, answer_length, answers_only, num_demonstrations=1):
    """Loss and PGM gradients of one train step on left-padded queries whose last `answer_length` tokens are labelled."""
    model.train()
    model.zero_grad(set_to_none=True)
    batch = left_padded(tok, QUERIES)
    labels = torch.full_like(batch.input_ids, -100)
    labels[:, -answer_length:] = batch.input_ids[:, -answer_length:]
    torch.manual_seed(0)  # the discrete design's Gumbel noise, the same in both passes
    prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=num_demonstrations)
    loss = model(
        prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
        only_labelled_logits=True, gradient_from_answers_only=answers_only,
    ).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_from_answers_only_keeps_the_loss_and_trains_the_pgm(family, design, scope, tok):
    """Reading the demonstrations and the query tokens before the answers without gradient gives the same loss, a
    gradient on every PGM parameter the full pass trains (only the paths through those tokens are cut, so it differs),
    and exactly the full gradient when there are no demonstrations and the whole query is the answer (nothing to cut)."""
    model = make_pgm(family, design, lora_scope=scope)
    for module in model.modules():  # GPT-2's dropout would draw different masks in the two passes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    full_loss, full = answer_gradients(model, tok, answer_length=3, answers_only=False)
    cut_loss, cut = answer_gradients(model, tok, answer_length=3, answers_only=True)
    torch.testing.assert_close(cut_loss, full_loss, atol=1e-5, rtol=0)
    assert set(cut) == set(full) and all(is_adapter(name) for name in cut)
    assert all(cut[name].abs().sum() > 0 for name in full if full[name].abs().sum() > 0)
    assert any(not torch.allclose(cut[name], full[name], atol=1e-6) for name in full)
    whole = left_padded(tok, QUERIES).input_ids.shape[1]
    _, full_whole = answer_gradients(model, tok, answer_length=whole, answers_only=False, num_demonstrations=0)
    _, cut_whole = answer_gradients(model, tok, answer_length=whole, answers_only=True, num_demonstrations=0)
    for name in full_whole:
        torch.testing.assert_close(cut_whole[name], full_whole[name], atol=1e-6, rtol=1e-4)


def test_gradient_from_answers_only_needs_labels(tok):
    model = make_pgm("llama", "prefix")
    batch = left_padded(tok, QUERIES)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    with pytest.raises(ValueError, match="needs labels"):
        model(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, gradient_from_answers_only=True)
