"""The four prompt designs: what each prompt holds, checked against an independent recomputation of the PGM pass."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, QUERIES, SCOPES, SHOTS, VOCAB_SIZE, K, left_padded, make_pgm, pgm_pass
from transformers import Cache

from peft_metal.compat import cache_kwargs, returned_cache


def dims(model):
    config = model.get_base_model().config
    hidden = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
    layers = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return hidden, layers, kv_heads, head_dim


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", SCOPES)
def test_discrete_prompt(scope, family, tok):
    model = make_pgm(family, "discrete", lora_scope=scope)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    assert prompt.design == "discrete" and prompt.num_tokens == K
    assert prompt.token_ids.dim() == 1 and prompt.token_ids.shape[0] == K
    assert prompt.token_ids.dtype == torch.long
    assert int(prompt.token_ids.min()) >= 0 and int(prompt.token_ids.max()) < VOCAB_SIZE
    assert prompt.text == tok.decode(prompt.token_ids)
    assert prompt.embeds is None, "an eval-mode discrete prompt carries only ids"
    # the ids are the argmax of the PGM's next-token logits at the padding positions
    reference = pgm_pass(model, tok, SHOTS)
    assert torch.equal(prompt.token_ids, reference.logits[0, -K:].argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", SCOPES)
def test_weighted_sum_prompt(scope, family, temperature, tok):
    model = make_pgm(family, "weighted_sum", temperature=temperature, lora_scope=scope)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    hidden, *_ = dims(model)
    assert prompt.embeds.shape == (K, hidden)
    assert prompt.token_ids is None and prompt.text is None
    reference = pgm_pass(model, tok, SHOTS)
    table = model.get_base_model().get_input_embeddings().weight
    expected = torch.softmax(reference.logits[0, -K:].float() / temperature, dim=-1) @ table
    torch.testing.assert_close(prompt.embeds, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", SCOPES)
def test_hidden_state_prompt(scope, family, tok):
    model = make_pgm(family, "hidden_state", lora_scope=scope)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    hidden, *_ = dims(model)
    assert prompt.embeds.shape == (K, hidden)
    reference = pgm_pass(model, tok, SHOTS)
    # they are the final (normalized) hidden states: exactly what the LM head turns into the logits
    head = model.get_base_model().get_output_embeddings()
    torch.testing.assert_close(head(prompt.embeds), reference.logits[0, -K:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prompt.embeds, reference.hidden_states[-1][0, -K:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", SCOPES)
def test_prefix_prompt(scope, family, tok):
    model = make_pgm(family, "prefix", lora_scope=scope)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    hidden, layers, kv_heads, head_dim = dims(model)
    assert prompt.keys.shape == (layers, kv_heads, K, head_dim)
    assert prompt.values.shape == (layers, kv_heads, K, head_dim)
    reference = pgm_pass(model, tok, SHOTS)
    for layer, cached in enumerate(returned_cache(reference).layers):
        torch.testing.assert_close(prompt.keys[layer], cached.keys[0, :, -K:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(prompt.values[layer], cached.values[0, :, -K:], atol=1e-5, rtol=1e-4)

    first, second = prompt.past_key_values, prompt.past_key_values
    assert isinstance(first, Cache) and first is not second
    assert first.get_seq_length() == K
    # extending one cache touches neither the prompt nor another cache
    keys_before = prompt.keys.clone()
    with torch.no_grad():
        model.get_base_model()(input_ids=torch.tensor([[40, 41, 42]]), **cache_kwargs(model.get_base_model(), first), use_cache=True)
    assert first.get_seq_length() == K + 3
    assert second.get_seq_length() == K
    assert prompt.past_key_values.get_seq_length() == K
    assert torch.equal(prompt.keys, keys_before)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_does_not_mutate_prefix_prompt(family, tok):
    model = make_pgm(family, "prefix")
    prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
    keys, values = prompt.keys.clone(), prompt.values.clone()
    batch = left_padded(tok, QUERIES)
    with torch.no_grad():
        first = model.generate(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=4)
        second = model.generate(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=4)
        model(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(prompt.keys, keys) and torch.equal(prompt.values, values)
    assert prompt.keys.shape[2] == K
    assert torch.equal(first, second)


@pytest.mark.parametrize("design", ["discrete", "weighted_sum", "hidden_state", "prefix"])
def test_demonstrations_are_the_last_shots(design, tok):
    model = make_pgm("llama", design)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=2)
    text = "".join(f"Input: {x}\nOutput: {y}\n\n" for x, y in SHOTS[1:])
    assert prompt.demonstrations_text == text
    assert prompt.demonstrations.tolist() == tok(text, add_special_tokens=False).input_ids
    assert prompt.context_length == K + len(text)
    # the PGM read only the first shot: same prompt as from that shot alone
    alone = model.generate_prompt(SHOTS[:1], tokenizer=tok)
    for name in ("token_ids", "embeds", "keys"):
        if getattr(alone, name) is not None:
            torch.testing.assert_close(getattr(prompt, name), getattr(alone, name), atol=1e-6, rtol=0)
    assert alone.num_demonstration_tokens == 0 and alone.context_length == K


def test_dict_shots_equal_pair_shots(tok):
    model = make_pgm("llama", "hidden_state")
    pairs = model.generate_prompt(SHOTS, tokenizer=tok)
    dicts = model.generate_prompt([{"input": x, "output": y} for x, y in SHOTS], tokenizer=tok)
    torch.testing.assert_close(pairs.embeds, dicts.embeds, atol=0, rtol=0)


def test_custom_template_is_what_the_pgm_reads(tok):
    """input_prefix / output_prefix / shot_separator from the config shape the text the PGM reads."""
    model = make_pgm("llama", "hidden_state", input_prefix="Q: ", output_prefix="\nA:", shot_separator="\n")
    prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
    assert prompt.demonstrations_text == "Q: great\nA: positive\n"
    default = make_pgm("llama", "hidden_state").generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
    assert not torch.allclose(prompt.embeds, default.embeds)


def test_prompt_metadata(tok):
    model = make_pgm("qwen2", "prefix")
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    fingerprint = prompt.base_fingerprint
    assert fingerprint["architecture"] == "Qwen2ForCausalLM"
    assert fingerprint["vocab_size"] == VOCAB_SIZE and fingerprint["num_layers"] == 2
    assert prompt.pgm_config["prompt_design"] == "prefix"
    assert prompt.pgm_config["num_prompt_tokens"] == K
    assert prompt.pgm_config["peft_type"] == "METAL_PROMPT"
