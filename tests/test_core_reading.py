"""The LM reading [prompt][demonstrations][query]: equals the plain base LM on the equivalent input."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DESIGNS,
    FAMILIES,
    QUERIES,
    SCOPES,
    SHOTS,
    K,
    encode,
    left_padded,
    make_lm,
    make_pgm,
    reference_greedy,
    reference_logits,
)

ATOL = 1e-5


def setup(family, design, tok, num_demonstrations=0, scope="all"):
    model = make_pgm(family, design, lora_scope=scope)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=num_demonstrations)
    return model, prompt, make_lm(family)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("num_demonstrations", [0, 1])
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_base_lm(family, design, num_demonstrations, scope, tok):
    model, prompt, reference = setup(family, design, tok, num_demonstrations, scope)
    assert prompt.num_demonstration_tokens == (len("Input: great\nOutput: positive\n\n") if num_demonstrations else 0)
    query = encode(tok, QUERIES[1])
    with torch.no_grad():
        got = model(prompt=prompt, input_ids=query.unsqueeze(0)).logits
    assert got.shape == (1, query.shape[0], reference.config.vocab_size)
    torch.testing.assert_close(got[0], reference_logits(reference, prompt, query), atol=ATOL, rtol=0)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_changes_the_logits(family, design, tok):
    """Guards the equivalence test against a reading that ignores the prompt."""
    model, prompt, reference = setup(family, design, tok)
    query = encode(tok, QUERIES[0])
    with torch.no_grad():
        got = model(prompt=prompt, input_ids=query.unsqueeze(0)).logits[0]
        plain = reference(input_ids=query.unsqueeze(0)).logits[0]
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("num_demonstrations", [0, 1])
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_rows_alone(family, design, num_demonstrations, scope, tok):
    model, prompt, _ = setup(family, design, tok, num_demonstrations, scope)
    batch = left_padded(tok, QUERIES)
    assert (batch.attention_mask == 0).any(), "the test needs a padded row"
    with torch.no_grad():
        logits = model(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        generated = model.generate(
            prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=4, do_sample=False
        )
        for row, text in enumerate(QUERIES):
            ids = encode(tok, text).unsqueeze(0)
            n = ids.shape[1]
            alone = model(prompt=prompt, input_ids=ids).logits
            torch.testing.assert_close(logits[row, -n:], alone[0], atol=ATOL, rtol=0)
            alone_gen = model.generate(prompt=prompt, input_ids=ids, max_new_tokens=4, do_sample=False)
            assert generated[row, -4:].tolist() == alone_gen[0, -4:].tolist()


@pytest.mark.parametrize("num_demonstrations", [0, 1])
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_greedy_base_lm(family, design, num_demonstrations, tok):
    model, prompt, reference = setup(family, design, tok, num_demonstrations)
    batch = left_padded(tok, QUERIES)
    n = 5
    with torch.no_grad():
        out = model.generate(
            prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=n, do_sample=False
        )
    assert out.shape == (2, batch.input_ids.shape[1] + n)
    assert torch.equal(out[:, : batch.input_ids.shape[1]], batch.input_ids), "the query ids must come first"
    for row, text in enumerate(QUERIES):
        assert out[row, -n:].tolist() == reference_greedy(reference, prompt, encode(tok, text), n), f"row {row}"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_discrete_equals_base_generate_on_prompt_tokens(family, tok):
    """For a discrete prompt the equivalent input is literally [prompt tokens; query] for lm.generate."""
    model, prompt, reference = setup(family, "discrete", tok)
    query = encode(tok, QUERIES[0]).unsqueeze(0)
    with torch.no_grad():
        out = model.generate(prompt=prompt, input_ids=query, max_new_tokens=6, do_sample=False)
        ref = reference.generate(input_ids=torch.cat([prompt.token_ids.unsqueeze(0), query], 1), max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref[:, K:])


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_sampling_with_seed(family, design, tok):
    model, prompt, _ = setup(family, design, tok)
    batch = left_padded(tok, QUERIES)
    kwargs = dict(
        prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=6, do_sample=True, top_k=20
    )
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.generate(**kwargs)
        torch.manual_seed(0)
        b = model.generate(**kwargs)
        samples = set()
        for seed in range(4):
            torch.manual_seed(seed + 1)
            samples.add(tuple(model.generate(**kwargs)[0, -6:].tolist()))
    assert a.shape == (2, batch.input_ids.shape[1] + 6)
    assert torch.equal(a[:, : batch.input_ids.shape[1]], batch.input_ids)
    assert torch.equal(a, b)
    assert len(samples) > 1, "sampling never varied"
    assert int(a.max()) < 128 and int(a.min()) >= 0


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_return_dict(family, design, tok):
    model, prompt, _ = setup(family, design, tok, num_demonstrations=1)
    batch = left_padded(tok, QUERIES)
    with torch.no_grad():
        plain = model.generate(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=3)
        out = model.generate(
            prompt=prompt,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=3,
            return_dict_in_generate=True,
            output_scores=True,
        )
    assert torch.equal(out.sequences, plain)
    assert len(out.scores) == 3 and out.scores[0].shape == (2, 128)
    assert torch.equal(out.scores[-1].argmax(-1), plain[:, -1])


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_over_query_labels(family, design, tok):
    """labels give the causal LM loss over the query positions only, like the base LM's on the query."""
    model, prompt, _ = setup(family, design, tok)
    batch = left_padded(tok, QUERIES)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        out = model(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert torch.isfinite(out.loss)


def test_generate_with_positional_input_ids(tok):
    model, prompt, _ = setup("llama", "discrete", tok)
    query = encode(tok, QUERIES[0]).unsqueeze(0)
    with torch.no_grad():
        a = model.generate(query, prompt=prompt, max_new_tokens=3, do_sample=False)
        b = model.generate(prompt=prompt, input_ids=query, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("design", DESIGNS)
def test_generate_max_length_counts_the_query_only(design, tok):
    """max_length means what it means for lm.generate on the query alone: query + new tokens.

    The prompt and demonstrations are hidden context; they must not eat into the user's max_length.
    """
    model, prompt, _ = setup("llama", design, tok, num_demonstrations=1)
    query = encode(tok, QUERIES[0]).unsqueeze(0)
    with torch.no_grad():
        by_new = model.generate(prompt=prompt, input_ids=query, max_new_tokens=3, do_sample=False)
        by_length = model.generate(prompt=prompt, input_ids=query, max_length=query.shape[1] + 3, do_sample=False)
    assert torch.equal(by_length, by_new)


@pytest.mark.parametrize("design", DESIGNS)
def test_generate_beam_search(design, tok):
    """num_beams > 1 works and, for a discrete prompt, equals beam search of the base LM on [prompt tokens; query]."""
    model, prompt, reference = setup("llama", design, tok)
    batch = left_padded(tok, QUERIES)
    with torch.no_grad():
        out = model.generate(
            prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=3, num_beams=2
        )
    assert out.shape == (2, batch.input_ids.shape[1] + 3)
    if design == "discrete":
        for row, text in enumerate(QUERIES):
            ids = torch.cat([prompt.token_ids, encode(tok, text)]).unsqueeze(0)
            with torch.no_grad():
                ref = reference.generate(input_ids=ids, max_new_tokens=3, num_beams=2)
            assert out[row, -3:].tolist() == ref[0, -3:].tolist()


@pytest.mark.parametrize("design", DESIGNS)
def test_generate_num_return_sequences(design, tok):
    model, prompt, _ = setup("llama", design, tok)
    batch = left_padded(tok, QUERIES)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            prompt=prompt,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=3,
            do_sample=True,
            num_return_sequences=3,
        )
    assert out.shape == (6, batch.input_ids.shape[1] + 3)
    assert torch.equal(out[:3, : batch.input_ids.shape[1]], batch.input_ids[:1].expand(3, -1))


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_labelled_logits_gives_the_same_loss_and_logits(family, design, tok):
    """Meta-training's shortcut (the LM head only over positions that predict answer tokens) changes nothing it uses:
    the loss, and the logits of those positions, equal the full forward's (left-padded queries, answers at the end)."""
    from peft_metal.metal_prompt.reading import forward_with_prompt

    _, prompt, reference = setup(family, design, tok)
    batch = left_padded(tok, [QUERIES[0] + " positive", QUERIES[1] + " negative!"])
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full_like(input_ids, -100)
    labels[0, -9:], labels[1, -10:] = input_ids[0, -9:], input_ids[1, -10:]
    with torch.no_grad():
        full = forward_with_prompt(reference, prompt, input_ids, attention_mask, labels=labels)
        short = forward_with_prompt(reference, prompt, input_ids, attention_mask, labels=labels, only_labelled_logits=True)
    assert short.logits.shape[1] == 11  # from the position predicting the first answer token to the end
    torch.testing.assert_close(short.loss, full.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(short.logits, full.logits[:, -11:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("design", DESIGNS)
def test_reads_into_the_cache_skip_the_lm_head(design, tok):
    """The context and the query tokens read without gradient only fill the cache: the LM head (a full-vocabulary
    matmul) runs once, over the positions whose logits are returned."""
    from peft_metal.metal_prompt.reading import context_cache, forward_with_prompt

    _, prompt, reference = setup("llama", design, tok, num_demonstrations=1)
    batch = left_padded(tok, [QUERIES[0] + " positive", QUERIES[1] + " negative!"])
    input_ids = batch["input_ids"]
    labels = torch.full_like(input_ids, -100)
    labels[0, -9:], labels[1, -10:] = input_ids[0, -9:], input_ids[1, -10:]
    rows = []
    handle = reference.get_output_embeddings().register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1]))
    with torch.no_grad():
        context_cache(reference, prompt)
        assert rows == []
        out = forward_with_prompt(reference, prompt, input_ids, batch["attention_mask"], labels=labels, gradient_from_answers_only=True)
    handle.remove()
    assert rows == [out.logits.shape[:-1]] == [(2, 11)]
