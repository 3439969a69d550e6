"""PEFT prompt-learning baselines (prompt_tuning, p_tuning, prefix_tuning) and metal+refine in the evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import K, build_tokenizer, make_lm, make_pgm
from peft.tuners.tuners_utils import BaseTunerLayer

from peft_metal.cli import main
from peft_metal.data import Example, Task
from peft_metal.evaluation import (
    BaselineOptions,
    evaluate,
    markdown_table,
    prepare_method,
    resolve_methods,
    resolve_refine_steps,
    train_baseline,
)
from peft_metal.evaluation.baselines import BASELINE_METHODS, baseline_context, right_padded
from peft_metal.evaluation.methods import encode, option_ids, query_input
from peft_metal.evaluation.settings import EvaluationSettings
from peft_metal.inference import (
    ModelParts,
    Sampling,
    empty_context,
    extend_context,
    generate,
    prompt_context,
    score_options,
)
from peft_metal.metal_prompt.queries import encode_queries
from peft_metal.metal_prompt.refine import DEFAULT_LR

# PEFT's own prefix tuning (peft 0.21) still hands the model `past_key_values`; only peft-metal's calls must not.
pytestmark = [
    pytest.mark.filterwarnings("default:`past_key_values` is deprecated:FutureWarning"),
    pytest.mark.one_thread,  # tiny models (conftest)
]


def _scores(lm, context, options):
    """Options scored after a context that already ends with its query."""
    return score_options(lm, context, [[]], [options])[0]


def _greedy(lm, context, n):
    return generate(lm, context, [[]], [Sampling(n)])[0].tokens

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st"]
RECORD_KEYS = {"task", "method", "metric", "score", "n", "prompt_seconds", "context_tokens", "eval_seconds"}
SHOTS = [Example("ab", "yes"), Example("cd", "no way"), Example("ef", "yes")]
PAIRS = [example.as_shot() for example in SHOTS]
QUERY = Example("gh", "no way", options=("yes", "no way"))




def mc_task(name="vowel"):
    options = ("yes", "no way")
    return Task(name, [Example(w, "yes" if w[0] in "aeio" else "no way", options=options) for w in WORDS])


def gen_task(name="upper"):
    return Task(name, [Example(w, w.upper()) for w in WORDS])


@pytest.fixture(scope="module")
def pgm():
    return make_pgm("llama", "prefix")


@pytest.fixture(scope="module")
def parts(pgm):
    return ModelParts.from_model(pgm)


VARIANTS = {
    "prompt_tuning/text": ("prompt_tuning", {}),
    "prompt_tuning/random": ("prompt_tuning", {"prompt_tuning_init": "random"}),
    "p_tuning/MLP": ("p_tuning", {}),
    "p_tuning/LSTM": ("p_tuning", {"p_tuning_encoder": "LSTM"}),
    "prefix_tuning": ("prefix_tuning", {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_baseline_training_lowers_the_loss(parts, tok, variant):
    method, options = VARIANTS[variant]
    trained = train_baseline(method, parts.lm, tok, parts.template, PAIRS, BaselineOptions(steps=6, **options), seed=0,
                             pgm_tokens=K)
    assert len(trained.losses) == 6 and trained.num_virtual_tokens == K and trained.seconds > 0
    assert trained.losses[-1] < trained.losses[0] - 0.01, trained.losses  # 3 shots <= batch size: the same batch
    assert not any(p.requires_grad for p in trained.model.parameters())


def test_zero_step_prompt_tuning_from_text_reads_like_the_text(parts, tok):
    """Virtual tokens initialized from the embeddings of "wxyz" (4 tokens = K) and not trained: scores and greedy
    tokens through the PEFT model equal the plain LM reading "wxyz" before the query."""
    options = BaselineOptions(steps=0, prompt_tuning_init_text="wxyz")
    prepared = prepare_method("prompt_tuning", parts, tok, SHOTS, baseline=options)
    assert prepared.context_tokens == K and prepared.info == {"train_steps": 0}
    got, _ = query_input(parts, tok, prepared, QUERY.input)
    text = extend_context(parts.lm, empty_context(), encode(tok, "wxyz" + parts.template.format_query(QUERY.input)))
    assert got.length == text.length == K + len(encode(tok, parts.template.format_query(QUERY.input)))
    options_ids = option_ids(parts, tok, QUERY.options)
    for a, b in zip(_scores(parts.lm, got, options_ids), _scores(parts.lm, text, options_ids)):
        assert a.sum_logprob == pytest.approx(b.sum_logprob, abs=1e-5) and a.num_tokens == b.num_tokens
    assert _greedy(parts.lm, got, 5) == _greedy(parts.lm, text, 5)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_scores_equal_the_peft_models_own_forward(parts, tok, method):
    """Options scored from the PEFT-made context equal the PEFT model reading [query; option] whole."""
    trained = train_baseline(method, parts.lm, tok, parts.template, PAIRS, BaselineOptions(steps=2), pgm_tokens=K)
    query = encode(tok, parts.template.format_query(QUERY.input))
    options = option_ids(parts, tok, QUERY.options)
    scores = _scores(parts.lm, baseline_context(trained, query), options)
    with torch.no_grad():
        for option, score in zip(options, scores):
            ids = torch.tensor([query + option])
            logits = trained.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(option) - 1 : -1]
            expected = F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(option)[:, None]).sum()
            assert score.sum_logprob == pytest.approx(float(expected), abs=1e-4)


def test_training_batches_are_right_padded_with_unchanged_positions(parts, tok):
    """Left padding moved to the right: each row's loss through the PEFT model is the row's loss alone."""
    trained = train_baseline("prompt_tuning", parts.lm, tok, parts.template, PAIRS, BaselineOptions(steps=0),
                             pgm_tokens=K)
    batch = right_padded(encode_queries([("a", "yes"), ("abcdefgh", "no way")], tok, parts.template, torch.device("cpu")))
    assert batch.attention_mask[:, 0].all() and (batch.labels[batch.attention_mask == 0] == -100).all()
    with torch.no_grad():
        together = trained.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        for row in range(2):
            n = int(batch.attention_mask[row].sum())
            alone = trained.model(input_ids=batch.input_ids[row : row + 1, :n]).logits[0]
            torch.testing.assert_close(together[row, : K + n], alone, atol=1e-5, rtol=1e-5)


def _pgm_state(pgm):
    return {name: tensor.detach().clone() for name, tensor in pgm.state_dict().items()}


def test_records_for_mc_and_generative_tasks_and_the_pgm_is_untouched(pgm, tok):
    shots = [("good", "positive"), ("bad", "negative")]
    with torch.no_grad():
        before_prompt = pgm.base_model.generate_prompt(shots, tokenizer=tok)
    state = _pgm_state(pgm)
    flags = {name: p.requires_grad for name, p in pgm.named_parameters()}
    lora = [(name, m._disable_adapters) for name, m in pgm.named_modules() if isinstance(m, BaseTunerLayer)]
    methods = ["metal", "metal+refine", *BASELINE_METHODS]
    results = evaluate(pgm, tok, [mc_task(), gen_task()], methods, shots=3, queries=2, seed=0, progress=False,
                       baseline_steps=2, refine_steps=2, max_new_tokens=3)
    assert [(r["task"], r["method"]) for r in results] == [(t, m) for t in ("vowel", "upper") for m in methods]
    by = {(r["task"], r["method"]): r for r in results}
    for record in results:
        assert RECORD_KEYS <= set(record) and "error" not in record, record
        assert record["n"] == 2 and 0.0 <= record["score"] <= 1.0 and record["prompt_seconds"] > 0
        assert record["context_tokens"] == K
    for task in ("vowel", "upper"):
        for method in BASELINE_METHODS:
            assert by[task, method]["train_steps"] == 2 and "refine_steps" not in by[task, method]
        assert by[task, "metal+refine"]["refine_steps"] == 2 and "train_steps" not in by[task, "metal+refine"]
    assert all("acc_norm" in by["vowel", m] for m in methods) and all("token_f1" in by["upper", m] for m in methods)

    assert _pgm_state(pgm).keys() == state.keys()
    assert all(torch.equal(tensor, state[name]) for name, tensor in _pgm_state(pgm).items())
    assert {name: p.requires_grad for name, p in pgm.named_parameters()} == flags
    assert all(p.grad is None for p in pgm.parameters())
    assert [(name, m._disable_adapters) for name, m in pgm.named_modules() if isinstance(m, BaseTunerLayer)] == lora
    with torch.no_grad():
        after_prompt = pgm.base_model.generate_prompt(shots, tokenizer=tok)
    assert torch.equal(before_prompt.keys, after_prompt.keys) and torch.equal(before_prompt.values, after_prompt.values)


def test_baselines_on_a_plain_lm(tok):
    """Without a PGM the baselines still run (K = 16, MetaL-Prompt's default) and leave the LM as it was."""
    lm = make_lm("gpt2")
    state = {name: tensor.clone() for name, tensor in lm.state_dict().items()}
    modules = [name for name, _ in lm.named_modules()]
    results = evaluate(lm, tok, [mc_task()], ["icl", "prefix_tuning"], shots=2, queries=1, seed=0, progress=False,
                       baseline_steps=1)
    assert results[1]["context_tokens"] == 16 and results[1]["train_steps"] == 1
    assert all(torch.equal(tensor, state[name]) for name, tensor in lm.state_dict().items())
    assert [name for name, _ in lm.named_modules()] == modules and not hasattr(lm, "peft_config")


def test_metal_refine_one_record_per_step_count(pgm, tok):
    results = evaluate(pgm, tok, [mc_task()], ["metal", "metal+refine"], shots=3, queries=3, seed=2, progress=False,
                       refine_steps="0,1,3")
    assert [(r["method"], r.get("refine_steps")) for r in results] == [
        ("metal", None), ("metal+refine", 0), ("metal+refine", 1), ("metal+refine", 3)
    ]
    metal, zero = results[0], results[1]
    names = ("acc", "acc_norm", "acc_per_token")
    assert [zero[name] for name in names] == [metal[name] for name in names]
    table = markdown_table(results)
    assert "| metal | metal+refine@0 | metal+refine@1 | metal+refine@3 |" in table


def test_refine_with_zero_steps_reads_like_metal(parts, tok):
    metal = prepare_method("metal", parts, tok, SHOTS)
    refined = prepare_method("metal+refine", parts, tok, SHOTS, refine_steps=0)
    assert refined.info == {"refine_steps": 0, "refine_lr": DEFAULT_LR} and refined.context_tokens == metal.context_tokens
    a, b = (extend_context(parts.lm, *query_input(parts, tok, p, QUERY.input)) for p in (metal, refined))
    torch.testing.assert_close(a.last_logits, b.last_logits, atol=1e-6, rtol=1e-6)
    moved = prepare_method("metal+refine", parts, tok, SHOTS, refine_steps=2, refine_lr=1e-1)
    assert not torch.allclose(extend_context(parts.lm, *query_input(parts, tok, moved, QUERY.input)).last_logits, a.last_logits)


def test_demos_alone_is_the_demonstrations_metal_demos_keeps(parts, tok):
    """`demos`: the last d shots as plain demonstrations, the context `metal+demos` has after its prompt."""
    alone = prepare_method("demos", parts, tok, SHOTS, num_demonstrations=1)
    with_prompt = prepare_method("metal+demos", parts, tok, SHOTS, num_demonstrations=1)
    kept = encode(tok, parts.template.format_shots([SHOTS[-1].as_shot()]))
    assert alone.context_tokens == len(kept) == with_prompt.context_tokens - K
    torch.testing.assert_close(alone.context.last_logits, extend_context(parts.lm, empty_context(), kept).last_logits)
    everything = prepare_method("icl", parts, tok, SHOTS)
    assert everything.context_tokens > alone.context_tokens
    with pytest.raises(ValueError, match="'demos' keeps the last num_demonstrations=3"):
        EvaluationSettings(methods="demos", shots=3, queries=1, num_demonstrations=3)


def test_demos_refine_keeps_the_demonstrations_and_tunes_only_the_prompt(parts, tok):
    """metal+demos+refine: the metal+demos context at 0 steps; with steps the prompt moves, the demonstrations stay."""
    demos = prepare_method("metal+demos", parts, tok, SHOTS, num_demonstrations=1)
    unrefined = prepare_method("metal+demos+refine", parts, tok, SHOTS, num_demonstrations=1, refine_steps=0)
    assert unrefined.context_tokens == demos.context_tokens > K
    a, b = (extend_context(parts.lm, *query_input(parts, tok, p, QUERY.input)) for p in (demos, unrefined))
    torch.testing.assert_close(a.last_logits, b.last_logits, atol=1e-6, rtol=1e-6)
    moved = prepare_method("metal+demos+refine", parts, tok, SHOTS, num_demonstrations=1, refine_steps=2, refine_lr=1e-1)
    assert moved.info == {"refine_steps": 2, "refine_lr": 1e-1} and moved.context_tokens == demos.context_tokens
    assert not torch.allclose(extend_context(parts.lm, *query_input(parts, tok, moved, QUERY.input)).last_logits, a.last_logits)
    # refined on the shots the PGM read, not on the demonstration the context already holds
    pairs = [example.as_shot() for example in SHOTS]
    with torch.no_grad():
        generated = parts.tuner.generate_prompt(pairs, tokenizer=tok, num_demonstrations=1)
    with torch.enable_grad():
        expected = parts.tuner.refine_prompt(generated, pairs[:-1], tok, steps=2, lr=1e-1, seed=0)
    query_ids = encode(tok, parts.template.format_query(QUERY.input))
    torch.testing.assert_close(
        extend_context(parts.lm, *query_input(parts, tok, moved, QUERY.input)).last_logits,
        extend_context(parts.lm, prompt_context(parts.lm, expected), query_ids).last_logits,
    )
    assert resolve_methods("metal+demos+refine") == ["metal+demos+refine"]
    settings = EvaluationSettings(methods="metal+demos+refine", shots=3, queries=1, num_demonstrations=1, refine_steps="0,2")
    assert settings.runs == [("metal+demos+refine", {"refine_steps": 0}), ("metal+demos+refine", {"refine_steps": 2})]
    with pytest.raises(ValueError, match="'metal\\+demos\\+refine' keeps the last num_demonstrations=3"):
        EvaluationSettings(methods="metal+demos+refine", shots=3, queries=1, num_demonstrations=3)


def test_method_names_and_step_lists():
    assert resolve_methods("metal+refine,prompt_tuning,p_tuning,prefix_tuning") == [
        "metal+refine", "prompt_tuning", "p_tuning", "prefix_tuning"
    ]
    with pytest.raises(ValueError, match="Did you mean 'prompt_tuning'"):
        resolve_methods("prompt-tuning")
    with pytest.raises(ValueError, match="Did you mean 'prefix_tuning'"):
        resolve_methods("prefix")
    assert resolve_refine_steps("0, 5,10") == [0, 5, 10] and resolve_refine_steps(3) == [3]
    for bad, message in (("1,1", "repeated"), ("x", "comma-separated"), ([-1], ">= 0"), ([], "empty")):
        with pytest.raises(ValueError, match=message):
            resolve_refine_steps(bad)
    with pytest.raises(ValueError, match="p_tuning_encoder"):
        BaselineOptions(p_tuning_encoder="GRU")


def test_bad_baseline_arguments_raise(pgm, tok):
    arguments = dict(tasks=[mc_task()], shots=2, queries=1, seed=0, progress=False)
    with pytest.raises(ValueError, match="baseline steps must be >= 0"):
        evaluate(pgm, tok, methods=["p_tuning"], baseline_steps=-1, **arguments)
    with pytest.raises(ValueError, match="refine_lr"):
        evaluate(pgm, tok, methods=["metal+refine"], refine_lr=0, **arguments)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        evaluate(pgm, tok, methods=["prompt_tuning"], **{**arguments, "shots": 0})


def test_cli_runs_every_method(tmp_path):
    make_lm("llama").save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    make_pgm("llama", "prefix").save_pretrained(tmp_path / "pgm")
    folder = tmp_path / "tasks" / "my_vowels"
    folder.mkdir(parents=True)
    examples = [{"input": w, "target_scores": {"yes": int(w[0] in "aeio"), "no": int(w[0] not in "aeio")}} for w in WORDS]
    (folder / "task.json").write_text(json.dumps({"name": "my_vowels", "examples": examples}))
    methods = "zero_shot,icl,metal,metal+demos,metal+refine,prompt_tuning,p_tuning,prefix_tuning"
    output = tmp_path / "results.json"
    code = main([
        "eval", "--model", str(tmp_path / "model"), "--pgm", str(tmp_path / "pgm"), "--task-dir", str(tmp_path / "tasks"),
        "--tasks", "my_vowels", "--shots", "3", "--queries", "1", "--methods", methods, "--num-demonstrations", "1",
        "--baseline-steps", "1", "--refine-steps", "0,1", "--p-tuning-encoder", "LSTM", "--output", str(output),
        "--no-progress",
    ])
    assert code == 0
    payload = json.loads(output.read_text())
    labels = [(r["method"], r.get("refine_steps")) for r in payload["results"]]
    assert labels == [(m, None) for m in methods.split(",")[:4]] + [("metal+refine", 0), ("metal+refine", 1)] + [
        (m, None) for m in BASELINE_METHODS
    ]
    assert all("error" not in r for r in payload["results"])
    assert payload["settings"]["refine_steps"] == [0, 1] and payload["settings"]["baseline"]["steps"] == 1
    assert payload["settings"]["baseline"]["p_tuning_encoder"] == "LSTM"
