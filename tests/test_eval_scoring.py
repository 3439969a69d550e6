"""Evaluation scoring: option log-likelihoods from a cached context equal re-encoding the whole text per option, for
every method; greedy decoding from the cache equals `generate`; exact match and token F1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import encode, make_lm, make_pgm

from peft_metal.data import Example
from peft_metal.evaluation import (
    ModelParts,
    cut_generation,
    empty_context,
    exact_match,
    extend_context,
    greedy_decode,
    normalize_answer,
    prepare_method,
    score_continuations,
    token_f1,
)
from peft_metal.evaluation.methods import option_ids, query_context
from peft_metal.metal_prompt import ShotTemplate

ATOL = 1e-4
SHOTS = [
    Example("good movie", "positive", options=("positive", "negative")),
    Example("bad film", "negative", options=("positive", "negative")),
    Example("great", "positive", options=("positive", "negative")),
    Example("dull", "negative", options=("positive", "negative")),
]
QUERY = Example("nice", "positive", options=("positive", "negative", "ok", "so-so really"))
@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread than on several competing ones (as in the core tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


CASES = [
    ("llama", "zero_shot", "prefix"),
    ("gpt2", "zero_shot", "prefix"),
    ("llama", "icl", "prefix"),
    ("gpt2", "icl", "prefix"),
    ("llama", "metal", "prefix"),
    ("llama", "metal", "hidden_state"),
    ("qwen2", "metal", "prefix"),
    ("llama", "metal+demos", "prefix"),
    ("llama", "metal+demos", "hidden_state"),
]


@torch.no_grad()
def reference_scores(method, model, prompt, reference_lm, tok, parts):
    """Log-likelihood of each option by re-encoding the full text [context][query][option] per option."""
    query = encode(tok, parts.template.format_query(QUERY.input))
    demos = encode(tok, parts.template.format_shots([s.as_shot() for s in SHOTS]))
    scores = []
    for option in option_ids(parts, tok, QUERY.options):
        option = torch.tensor(option)
        if method in ("metal", "metal+demos"):
            ids = torch.cat([query, option])
            logits = model(prompt=prompt, input_ids=ids.unsqueeze(0)).logits[0]
        else:
            ids = torch.cat([demos, query, option]) if method == "icl" else torch.cat([query, option])
            logits = reference_lm(input_ids=ids.unsqueeze(0)).logits[0]
        logprobs = F.log_softmax(logits.float(), -1)[-len(option) - 1 : -1].gather(-1, option.unsqueeze(-1))
        scores.append((float(logprobs.sum()), float(logprobs.mean())))
    return scores


@pytest.mark.parametrize("family, method, design", CASES)
def test_cached_option_scores_equal_full_reencoding(family, method, design, tok):
    model = make_pgm(family, design)
    parts = ModelParts.from_model(model)
    prepared = prepare_method(method, parts, tok, SHOTS, num_demonstrations=2)
    context = query_context(parts, tok, prepared, QUERY.input)
    got = score_continuations(parts.lm, context, option_ids(parts, tok, QUERY.options))

    prompt = None
    if method.startswith("metal"):
        prompt = model.generate_prompt([s.as_shot() for s in SHOTS], tok, num_demonstrations=2 if "demos" in method else 0)
    expected = reference_scores(method, model, prompt, make_lm(family), tok, parts)
    for score, (total, mean), option in zip(got, expected, option_ids(parts, tok, QUERY.options)):
        assert score.num_tokens == len(option)
        assert score.sum_logprob == pytest.approx(total, abs=ATOL)
        assert score.mean_logprob == pytest.approx(mean, abs=ATOL)
    assert len({s.num_tokens for s in got}) > 1  # options of different lengths were batched together


def test_context_tokens_per_method(tok):
    model = make_pgm("llama", "prefix")
    parts = ModelParts.from_model(model)
    demo_chars = len(ShotTemplate().format_shots([s.as_shot() for s in SHOTS]))
    last_two = len(ShotTemplate().format_shots([s.as_shot() for s in SHOTS[2:]]))
    tokens = {m: prepare_method(m, parts, tok, SHOTS, num_demonstrations=2).context_tokens for m in
              ("zero_shot", "icl", "metal", "metal+demos")}
    assert tokens == {"zero_shot": 0, "icl": demo_chars, "metal": 4, "metal+demos": 4 + last_two}


def test_scoring_rejects_empty_continuations_and_contexts_without_logits(tok):
    lm = make_lm("llama")
    context = extend_context(lm, extend_context(lm, empty_context(), [40, 41]), [])  # extending by nothing: same
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(lm, context, [[40], []])
    with pytest.raises(ValueError, match="no next-token logits"):
        score_continuations(lm, empty_context(), [[40]])


@pytest.mark.parametrize("method, design", [("zero_shot", "prefix"), ("metal", "prefix"), ("metal+demos", "hidden_state")])
def test_greedy_from_cache_equals_generate(method, design, tok):
    model = make_pgm("llama", design)
    parts = ModelParts.from_model(model)
    prepared = prepare_method(method, parts, tok, SHOTS, num_demonstrations=1)
    got = greedy_decode(parts.lm, query_context(parts, tok, prepared, QUERY.input), max_new_tokens=6)
    query = encode(tok, parts.template.format_query(QUERY.input)).unsqueeze(0)
    with torch.no_grad():
        if method == "zero_shot":
            expected = make_lm("llama").generate(query, max_new_tokens=6, do_sample=False)
        else:
            prompt = model.generate_prompt([s.as_shot() for s in SHOTS], tok, num_demonstrations=1 if "demos" in method else 0)
            expected = model.generate(prompt=prompt, input_ids=query, max_new_tokens=6, do_sample=False)
    assert got == expected[0, query.shape[1]:].tolist()


def test_greedy_stops_at_eos_and_stop_condition(tok):
    lm = make_lm("llama")
    context = extend_context(lm, empty_context(), encode(tok, "Input: a\nOutput:").tolist())
    free = greedy_decode(lm, context, 5)
    assert len(free) == 5
    eos = free[2]
    assert greedy_decode(lm, context, 5, eos_token_ids=[eos]) == free[: free.index(eos)]
    assert greedy_decode(lm, context, 5, stop=lambda tokens: len(tokens) == 2) == free[:2]


def test_answer_normalization_exact_match_and_f1():
    assert normalize_answer("  The  Answer, is: 42! ") == "the answer is 42"
    assert normalize_answer("?") == "?"  # punctuation-only answers keep their punctuation
    assert exact_match("the answer is 42.", ["THE ANSWER IS 42"]) == 1.0
    assert exact_match("42", ["forty two", "42"]) == 1.0
    assert exact_match("4", ["42"]) == 0.0
    assert exact_match("", ["?"]) == 0.0 and exact_match("?", ["?"]) == 1.0
    assert token_f1("new york city", ["New York"]) == pytest.approx(0.8)
    assert token_f1("paris", ["london", "Paris!"]) == 1.0
    assert token_f1("a b", ["c d"]) == 0.0
    assert token_f1("", ["x"]) == 0.0
    template = ShotTemplate()
    assert cut_generation(" Paris\n\nInput: next", template) == "Paris"
    assert cut_generation(" New York\nmore", template) == "New York"
    assert cut_generation(" 42", template) == "42"
