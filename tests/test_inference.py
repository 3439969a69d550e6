"""The inference layer: option log-likelihoods from a cached context equal re-encoding the whole text per option, for
every evaluation method; greedy decoding from the cache equals `generate`; token log-probabilities of a text; answer
cutting, exact match and token F1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import encode, make_lm, make_pgm

from peft_metal.data import Example
from peft_metal.evaluation import exact_match, normalize_answer, prepare_method, token_f1
from peft_metal.evaluation.methods import option_ids, query_input
from peft_metal.inference import (
    ModelParts,
    Sampling,
    cut_generation,
    empty_context,
    extend_context,
    generate,
    prompt_context,
    score_options,
    score_tokens,
)
from peft_metal.metal_prompt import ShotTemplate

ATOL = 1e-4
SHOTS = [
    Example("good movie", "positive", options=("positive", "negative")),
    Example("bad film", "negative", options=("positive", "negative")),
    Example("great", "positive", options=("positive", "negative")),
    Example("dull", "negative", options=("positive", "negative")),
]
QUERY = Example("nice", "positive", options=("positive", "negative", "ok", "so-so really"))


def greedy(lm, context, query, max_new_tokens, **sampling):
    """Greedy tokens for one query: a batch of one."""
    return generate(lm, context, [query], [Sampling(max_new_tokens, **sampling.pop("settings", {}))], **sampling)[0].tokens
pytestmark = pytest.mark.one_thread  # tiny models (conftest)


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
    context, query = query_input(parts, tok, prepared, QUERY.input)
    got = score_options(parts.lm, context, [query], [option_ids(parts, tok, QUERY.options)])[0]

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


def test_scoring_rejects_empty_options_and_queries(tok):
    lm = make_lm("llama")
    context = extend_context(lm, extend_context(lm, empty_context(), [40, 41]), [])  # extending by nothing: same
    with pytest.raises(ValueError, match="empty option"):
        score_options(lm, context, [[42]], [[[40], []]])
    with pytest.raises(ValueError, match="at least one token"):
        score_options(lm, empty_context(), [[]], [[[40]]])  # nothing read: an empty query predicts nothing
    with pytest.raises(ValueError, match="at least one token"):
        score_options(lm, context, [[42], []], [[[40]], [[40]]])


def test_a_context_that_ends_with_its_query_equals_reading_the_query_after_it(tok):
    lm = make_lm("llama")
    before = extend_context(lm, empty_context(), [40, 41])
    after = extend_context(lm, before, [42, 43])
    options = [[44], [45, 46]]
    for got, expected in zip(score_options(lm, after, [[]], [options])[0], score_options(lm, before, [[42, 43]], [options])[0]):
        assert got.sum_logprob == pytest.approx(expected.sum_logprob, abs=ATOL)
    assert greedy(lm, after, [], 4) == greedy(lm, before, [42, 43], 4)


def test_token_logprobs_equal_the_lms_own_forward(tok):
    lm = make_lm("llama")
    ids = [40, 41, 42, 43, 44]
    with torch.no_grad():
        logprobs = F.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    scored = score_tokens(lm, empty_context(), ids, top=3)
    assert scored[0].logprob is None and scored[0].top == {}  # nothing before the first token
    for i, item in enumerate(scored[1:], start=1):
        assert item.token_id == ids[i] and item.logprob == pytest.approx(float(logprobs[i - 1, ids[i]]), abs=ATOL)
        top = torch.topk(logprobs[i - 1], 3)
        assert list(item.top) == top.indices.tolist()
    # after a context, the first token is scored by the context's last logits
    context = extend_context(lm, empty_context(), ids[:2])
    after = score_tokens(lm, context, ids[2:])
    assert [t.logprob for t in after] == pytest.approx([t.logprob for t in scored[2:]], abs=ATOL)


@pytest.mark.parametrize("method, design", [("zero_shot", "prefix"), ("metal", "prefix"), ("metal+demos", "hidden_state")])
def test_greedy_from_cache_equals_generate(method, design, tok):
    model = make_pgm("llama", design)
    parts = ModelParts.from_model(model)
    prepared = prepare_method(method, parts, tok, SHOTS, num_demonstrations=1)
    got = greedy(parts.lm, *query_input(parts, tok, prepared, QUERY.input), max_new_tokens=6)
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
    query = encode(tok, "Input: a\nOutput:").tolist()
    free = greedy(lm, empty_context(), query, 5)
    assert len(free) == 5
    eos = free[2]
    assert greedy(lm, empty_context(), query, 5, eos_token_ids=[eos]) == free[: free.index(eos)]
    assert greedy(lm, empty_context(), query, 5, settings={"stop": lambda tokens: len(tokens) == 2}) == free[:2]


@pytest.mark.parametrize("family,design", [("llama", "discrete"), ("gpt2", "prefix"), ("qwen2", "hidden_state")])
def test_a_batch_equals_one_query_at_a_time(tok, family, design):
    """Left-padded batches (ragged queries, ragged options, after a prompt or after nothing) give what each query
    gives alone (a batch of one, no padding)."""
    model = make_pgm(family, design)
    lm = model.base_model.model
    prompt = model.base_model.generate_prompt([s.as_shot() for s in SHOTS], tokenizer=tok, num_demonstrations=1)

    def encode(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    queries = [encode(f"Input: {text}\nOutput:") for text in ["nice", "a dull film", "wonderful acting", "x"]]
    options = [[encode(" positive"), encode(" negative")], [encode(" a")], [encode(" b"), encode(" a longer one"), encode(" c")], [encode(" yes")]]
    for context in (prompt_context(lm, prompt), empty_context()):
        generations = generate(lm, context, queries, [Sampling(n) for n in (6, 3, 6, 1)], pad_id=1)
        scores = score_options(lm, context, queries, options, pad_id=1)
        for query, n, generation, query_options, got in zip(queries, [6, 3, 6, 1], generations, options, scores):
            assert generation.tokens == greedy(lm, context, query, n) and generation.finish_reason == "length"
            expected = score_options(lm, context, [query], [query_options])[0]
            assert [s.sum_logprob for s in got] == pytest.approx([s.sum_logprob for s in expected], abs=1e-4)
            assert [s.num_tokens for s in got] == [s.num_tokens for s in expected]
        # A cache budget of one byte reads one option row per forward: the same scores.
        one_row_at_a_time = score_options(lm, context, queries, options, pad_id=1, cache_budget_bytes=1)
        for together, apart in zip(scores, one_row_at_a_time):
            assert [s.sum_logprob for s in apart] == pytest.approx([s.sum_logprob for s in together], abs=1e-4)


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


@pytest.mark.parametrize("settings", [{"temperature": 5e-324}, {"temperature": 1.0, "top_p": 5e-324}])
def test_sampling_near_zero_settings_keeps_the_top_token(settings):
    """A temperature or top_p so small that float32 rounds it to zero still samples (the greedy token), not NaNs."""
    lm = make_lm("llama")
    query = [5, 6, 7, 8]
    expected = greedy(lm, empty_context(), query, 4)
    generator = torch.Generator().manual_seed(0)
    assert greedy(lm, empty_context(), query, 4, settings={**settings, "generator": generator}) == expected


def test_a_module_marked_one_thread_runs_on_one():
    """The marker this module carries (conftest's fixture): tiny models stay fast on a shared machine."""
    assert torch.get_num_threads() == 1
