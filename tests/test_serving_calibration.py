"""Calibrated option scoring in the service: a prompt made with `calibrate` records the prior it gives its shots'
labels (the same the evaluation's calibration reads), and completions with `calibrate` pick by it."""

from __future__ import annotations

import pytest
from conftest import SERVED_SHOTS, build_tokenizer, make_pgm
from fastapi.testclient import TestClient

from peft_metal.inference import calibrated_scores, option_prior, prompt_context, score_options
from peft_metal.serving.app import create_app
from peft_metal.serving.store import PromptStore

SHOTS = SERVED_SHOTS
LABELS = ["positive", "negative"]
INPUTS = ["nice", "a dull film", "wonderful acting", "so bad"]

pytestmark = pytest.mark.one_thread  # tiny models (conftest)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def served(tmp_path, tok):
    model = make_pgm("llama", "prefix")
    store = PromptStore(tmp_path / "store")
    with TestClient(create_app(model, tok, store)) as client:
        yield client, model, store


def _reference(model, tok, context, texts, labels):
    """Every label scored after every text, as evaluation scores options (`score_options`)."""
    lm, template = model.base_model.model, model.base_model.template
    queries = [tok(template.format_query(text), add_special_tokens=False)["input_ids"] for text in texts]
    ids = [tok(template.format_answer(label), add_special_tokens=False)["input_ids"] for label in labels]
    return [[s.mean_logprob for s in row] for row in score_options(lm, context, queries, [ids] * len(queries))]


def _complete(client, prompt_id, **fields):
    body = {"model": f"metal:{prompt_id}", "template": True, "prompt": INPUTS, "options": LABELS, **fields}
    return client.post("/v1/completions", json=body)


def test_a_calibrated_prompt_records_the_prior_of_its_shots_and_completions_divide_it_out(served, tok):
    client, model, store = served
    made = client.post("/v1/prompts", json={"task": "sentiment", "shots": SHOTS, "num_demonstrations": 1, "calibrate": True})
    assert made.status_code == 201, made.text
    prompt_id, prior = made.json()["prompt_id"], made.json()["option_prior"]
    context = prompt_context(model.base_model.model, store.get(prompt_id))
    shot_scores = _reference(model, tok, context, [shot["input"] for shot in SHOTS], LABELS)
    assert prior == pytest.approx(option_prior([(LABELS, row) for row in shot_scores]))
    assert sum(prior.values()) == pytest.approx(1.0) and store.option_prior(prompt_id) == prior
    assert client.get(f"/v1/prompts/{prompt_id}").json()["option_prior"] == prior  # its status shows it

    response = _complete(client, prompt_id, calibrate=True)
    assert response.status_code == 200, response.text
    for row, choice in zip(_reference(model, tok, context, INPUTS, LABELS), response.json()["choices"]):
        expected = calibrated_scores(LABELS, row, prior)
        got = [score["calibrated_logprob"] for score in choice["option_scores"]]
        assert got == pytest.approx(expected, abs=1e-4)
        assert choice["text"] == LABELS[max(range(2), key=lambda i: expected[i])]
    plain = _complete(client, prompt_id).json()["choices"][0]["option_scores"]
    assert all(score.get("calibrated_logprob") is None for score in plain)

    again = client.post("/v1/prompts", json={"task": "sentiment", "shots": SHOTS, "num_demonstrations": 1, "calibrate": True})
    assert again.status_code == 200 and again.json()["option_prior"] == prior  # recorded once, read back


def test_the_shots_are_read_a_batch_at_a_time_to_the_same_prior(tmp_path, tok, monkeypatch):
    """Many shots are read in model steps of CALIBRATION_BATCH, completions served between: the prior is the same."""
    import peft_metal.serving.service as service

    priors = []
    for batch in (len(SHOTS), 3):
        monkeypatch.setattr(service, "CALIBRATION_BATCH", batch)
        with TestClient(create_app(make_pgm("llama", "prefix"), tok, PromptStore(tmp_path / f"s{batch}"))) as client:
            priors.append(client.post("/v1/prompts", json={"task": "t", "shots": SHOTS, "calibrate": True}).json()["option_prior"])
    assert priors[0] == pytest.approx(priors[1])


def test_a_prompt_made_without_calibrate_is_calibrated_by_asking_again(served):
    client, _, store = served
    first = client.post("/v1/prompts", json={"task": "sentiment", "shots": SHOTS})
    assert "option_prior" not in first.json()
    prompt_id = first.json()["prompt_id"]
    refused = _complete(client, prompt_id, calibrate=True)
    assert refused.status_code == 422 and "calibrate: true" in refused.json()["error"]["message"]
    again = client.post("/v1/prompts", json={"task": "sentiment", "shots": SHOTS, "calibrate": True})
    assert again.json()["prompt_id"] == prompt_id and set(again.json()["option_prior"]) == set(LABELS)
    assert _complete(client, prompt_id, calibrate=True).status_code == 200
    client.delete(f"/v1/prompts/{prompt_id}")
    assert store.option_prior(prompt_id) is None  # deleted with its prompt


def test_a_refined_prompt_gets_the_prior_of_the_refined_prompt(served, tok):
    client, model, store = served
    body = {"task": "sentiment", "shots": SHOTS, "refine_steps": 2, "calibrate": True}
    made = client.post("/v1/prompts?wait=60", json=body)
    assert made.status_code == 201, made.text
    prompt_id, prior = made.json()["prompt_id"], made.json()["option_prior"]
    context = prompt_context(model.base_model.model, store.get(prompt_id))
    shot_scores = _reference(model, tok, context, [shot["input"] for shot in SHOTS], LABELS)
    assert prior == pytest.approx(option_prior([(LABELS, row) for row in shot_scores]))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(options=None, max_tokens=2), "send options too"),
        (dict(template=False), "template: true"),
        (dict(options=["positive", "neutral"]), "['neutral'] are not among the labels"),
    ],
)
def test_calibrated_completions_that_cannot_be_are_refused(served, fields, message):
    client, _, _ = served
    prompt_id = client.post("/v1/prompts", json={"task": "t", "shots": SHOTS, "calibrate": True}).json()["prompt_id"]
    body = {"model": f"metal:{prompt_id}", "template": True, "prompt": INPUTS, "options": LABELS, "calibrate": True}
    body = {key: value for key, value in {**body, **fields}.items() if value is not None}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 422 and message in response.json()["error"]["message"], response.text


def test_the_base_model_has_no_prior(served):
    client, _, _ = served
    model = client.app.state.service.model_name
    body = {"model": model, "template": True, "prompt": "nice", "options": LABELS, "calibrate": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 422 and "the base model has none" in response.json()["error"]["message"]


def test_store_refuses_a_prior_for_no_prompt_and_damaged_priors_are_named(tmp_path):
    from peft_metal.serving.store import DamagedPromptError, PromptNotFoundError

    store = PromptStore(tmp_path / "s")
    with pytest.raises(PromptNotFoundError, match="no option prior can be recorded"):
        store.put_option_prior("0" * 32, {"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="must map labels to probabilities"):
        store.put_option_prior("0" * 32, {"a": 2.0})
    store._db.execute("INSERT INTO option_priors (prompt_id, prior) VALUES (?, ?)", ("1" * 32, '{"a": "x"}'))
    with pytest.raises(DamagedPromptError, match="option prior is damaged"):
        store.option_prior("1" * 32)
