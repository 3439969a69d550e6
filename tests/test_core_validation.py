"""Bad input is refused early with ValueError/TypeError and a message that says what to change."""

from __future__ import annotations

import pytest
import torch
from conftest import DESIGNS, FAMILIES, QUERIES, SHOTS, K, encode, format_shots, make_lm, make_pgm

from peft_metal import MetaLPromptConfig


@pytest.fixture(scope="module")
def model():
    return make_pgm("llama", "discrete")


def test_no_shots(model, tok):
    with pytest.raises(ValueError, match="[Nn]o shots"):
        model.generate_prompt([], tokenizer=tok)


@pytest.mark.parametrize("shots", ["input output", b"xy", None, 3, {"input": "a", "output": "b"}])
def test_shots_not_a_list(model, tok, shots):
    with pytest.raises(TypeError, match="shots"):
        model.generate_prompt(shots, tokenizer=tok)


@pytest.mark.parametrize("shot", [("only one",), ("a", "b", "c"), "ab", 5, None])
def test_shot_not_a_pair(model, tok, shot):
    with pytest.raises(TypeError, match="Shot 1") as info:
        model.generate_prompt([("a", "b"), shot], tokenizer=tok)
    assert "pair" in str(info.value)


@pytest.mark.parametrize("shot", [("a", 1), (None, "b"), (["a"], "b"), {"input": "a", "output": 2.5}])
def test_non_string_fields(model, tok, shot):
    with pytest.raises(TypeError, match="must be a string") as info:
        model.generate_prompt([shot], tokenizer=tok)
    assert "Shot 0" in str(info.value)


@pytest.mark.parametrize("shot,missing", [({"input": "a"}, "output"), ({"output": "b"}, "input"), ({}, "input")])
def test_dict_shot_missing_key(model, tok, shot, missing):
    with pytest.raises(ValueError, match=missing):
        model.generate_prompt([("x", "y"), shot], tokenizer=tok)


def test_unknown_design():
    with pytest.raises(ValueError, match="prompt_design") as info:
        MetaLPromptConfig(task_type="CAUSAL_LM", prompt_design="soft")
    assert "weighted_sum" in str(info.value)


def test_unknown_padding_reparameterization():
    with pytest.raises(ValueError, match="padding_reparameterization"):
        MetaLPromptConfig(task_type="CAUSAL_LM", padding_reparameterization="gru")


@pytest.mark.parametrize("k", [0, -1])
def test_num_prompt_tokens_not_positive(k):
    with pytest.raises(ValueError, match="num_prompt_tokens") as info:
        MetaLPromptConfig(task_type="CAUSAL_LM", num_prompt_tokens=k)
    assert str(k) in str(info.value)


@pytest.mark.parametrize("k", [2.0, "4", True])
def test_num_prompt_tokens_not_int(k):
    with pytest.raises(TypeError, match="num_prompt_tokens"):
        MetaLPromptConfig(task_type="CAUSAL_LM", num_prompt_tokens=k)


@pytest.mark.parametrize("temperature", [0, -0.5])
def test_temperature_not_positive(temperature):
    with pytest.raises(ValueError, match="temperature"):
        MetaLPromptConfig(task_type="CAUSAL_LM", temperature=temperature)


def test_template_fields_must_be_strings():
    with pytest.raises(TypeError, match="input_prefix"):
        MetaLPromptConfig(task_type="CAUSAL_LM", input_prefix=None)


@pytest.mark.parametrize("num_demonstrations", [3, 4, -1])
def test_num_demonstrations_out_of_range(model, tok, num_demonstrations):
    with pytest.raises(ValueError, match="num_demonstrations") as info:
        model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=num_demonstrations)
    assert "3 shots" in str(info.value)


@pytest.mark.parametrize("num_demonstrations", [1.0, "1", True])
def test_num_demonstrations_not_int(model, tok, num_demonstrations):
    with pytest.raises(TypeError, match="num_demonstrations"):
        model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=num_demonstrations)


@pytest.mark.parametrize("family", FAMILIES)
def test_shots_over_the_context(family, tok):
    small = make_pgm(family, "prefix", lm=make_lm(family, max_positions=64))
    shots = [("a fairly long input sentence", "an output"), ("another input", "out")]
    needed = len(format_shots(shots)) + K
    assert needed > 64
    with pytest.raises(ValueError) as info:
        small.generate_prompt(shots, tokenizer=tok)
    message = str(info.value)
    assert f"{needed - 64} over" in message and "64" in message
    # keeping the long shot as a demonstration makes the PGM's part fit
    fits = [("in", "out"), ("a fairly long input sentence", "an output")]
    small.generate_prompt(fits, tokenizer=tok, num_demonstrations=1)


@pytest.mark.parametrize("design", DESIGNS)
def test_query_over_the_context(design, tok):
    small = make_pgm("llama", design, lm=make_lm("llama", max_positions=64))
    prompt = small.generate_prompt([("a", "b"), ("c", "d")], tokenizer=tok, num_demonstrations=1)
    context = prompt.context_length
    query = encode(tok, "Input: " + "x" * (64 - context - 7 - 8) + "\nOutput:").unsqueeze(0)
    q = query.shape[1]
    assert context + q <= 64
    with torch.no_grad():
        small(prompt=prompt, input_ids=query)  # fits for scoring
        over = context + q + 10 - 64
        with pytest.raises(ValueError) as info:
            small.generate(prompt=prompt, input_ids=query, max_new_tokens=10)
        assert f"{over} over" in str(info.value)
        long_query = torch.cat([query, query], 1)
        with pytest.raises(ValueError) as info:
            small(prompt=prompt, input_ids=long_query)
        assert f"{context + 2 * q - 64} over" in str(info.value)


@pytest.mark.parametrize("bad", ["a prompt", {"token_ids": [1, 2]}, torch.tensor([1, 2, 3]), 0])
def test_prompt_of_wrong_type(model, tok, bad):
    query = encode(tok, QUERIES[0]).unsqueeze(0)
    with pytest.raises(TypeError, match="GeneratedPrompt"):
        model(prompt=bad, input_ids=query)
    with pytest.raises(TypeError, match="GeneratedPrompt"):
        model.generate(prompt=bad, input_ids=query, max_new_tokens=2)


def test_prompt_with_inputs_embeds(model, tok):
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    embeds = model.get_base_model().get_input_embeddings()(encode(tok, QUERIES[0]).unsqueeze(0))
    with pytest.raises(ValueError, match="input_ids"):
        model(prompt=prompt, inputs_embeds=embeds)


def test_missing_tokenizer(model):
    with pytest.raises(TypeError, match="tokenizer"):
        model.generate_prompt(SHOTS)
    with pytest.raises(TypeError, match="tokenizer"):
        model.generate_prompt(SHOTS, tokenizer=None)
    with pytest.raises(TypeError, match="tokenizer"):
        model.generate_prompt(SHOTS, tokenizer=lambda text: text)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_prompt_tokens": 256}, "num_prompt_tokens \\(K\\) = 256 leaves no position for the shots: the model reads at most 256"),
        ({"num_prompt_tokens": 2**31}, "leaves no position for the shots"),
        ({"r": 33}, "LoRA rank r = 33 is larger than the model's hidden size 32"),
        ({"r": 2**40}, "choose r <= 32"),
    ],
)
def test_sizes_the_model_cannot_use_are_refused_before_allocating(overrides, message):
    """K at or past the LM's context, or a LoRA rank past its width, would be allocated whole (an edited config
    with K = 2**31 took all the memory); both are refused by name instead."""
    with pytest.raises(ValueError, match=message):
        make_pgm("llama", "prefix", **overrides)
    make_pgm("llama", "prefix", num_prompt_tokens=255, r=32)  # the largest sizes that fit still build
