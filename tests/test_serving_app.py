"""The HTTP service with tiny models: prompts made once and reused, completions (OpenAI's shape, with the template
extension) equal to the evaluation path, micro-batching, errors in OpenAI's envelope, auth and metrics."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
import torch
from conftest import MAX_POSITIONS, SERVED_SHOTS, K, build_tokenizer, make_pgm
from fastapi.testclient import TestClient

from peft_metal.inference import (
    Sampling,
    cut_generation,
    empty_context,
    extend_context,
    generate,
    has_stop,
    prompt_context,
    score_options,
)
from peft_metal.serving.app import create_app
from peft_metal.serving.store import PromptStore

SHOTS = SERVED_SHOTS
INPUTS = ["nice", "a dull film", "wonderful acting", "x", "so bad", "fine", "the worst movie ever", "ok"]
OPTIONS = ["positive", "negative", "neutral"]


pytestmark = pytest.mark.one_thread  # tiny models (conftest)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _app(tmp_path: Path, tok, design: str = "discrete", **kwargs):
    model = make_pgm("llama", design)
    store = PromptStore(tmp_path / f"store-{design}")
    return create_app(model, tok, store, **kwargs), model, store


@pytest.fixture
def served(tmp_path, tok):
    app, model, store = _app(tmp_path, tok)
    with TestClient(app) as client:
        yield client, model, store


def _create(client, shots=SHOTS, task="sentiment", num_demonstrations=0, **kwargs):
    return client.post(
        "/v1/prompts", json={"task": task, "shots": shots, "num_demonstrations": num_demonstrations}, **kwargs
    )


def _body(app, prompt_id=None, **fields):
    """A completion as evaluation reads it: `model` the stored prompt (or the base model), each prompt formatted with
    the shot template (`template`, peft-metal's extension), greedy."""
    model = f"metal:{prompt_id}" if prompt_id else app.state.service.model_name
    return {"model": model, "template": True, "temperature": 0, **fields}


def _complete(client, prompt_id=None, headers=None, **fields):
    return client.post("/v1/completions", json=_body(client.app, prompt_id, **fields), headers=headers)


def _message(response) -> str:
    """The message of OpenAI's error envelope (and a check that the envelope is there)."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error["message"]


def _metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = "^" + re.escape(name + ("{" + label_text + "}" if labels else "")) + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name} {labels} not in metrics:\n{text}"
    return float(match.group(1))


def _count_calls(model) -> list[int]:
    calls = []
    original = model.base_model.prompt_passes

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.base_model.prompt_passes = counting
    return calls


# ------------------------------------------------------------------------------------------------------ prompts


def test_create_then_reuse(served):
    client, model, store = served
    calls = _count_calls(model)
    first = _create(client)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["cached"] is False and body["design"] == "discrete" and body["num_tokens"] == K
    assert isinstance(body["text"], str) and body["num_demonstrations"] == 0
    again = _create(client)
    assert again.status_code == 200
    assert again.json()["prompt_id"] == body["prompt_id"] and again.json()["cached"] is True
    assert again.json()["text"] == body["text"]
    assert len(calls) == 1
    other = _create(client, num_demonstrations=1)  # another split is another prompt
    assert other.status_code == 201 and other.json()["prompt_id"] != body["prompt_id"]
    metrics = client.get("/metrics").text
    assert _metric(metrics, "peft_metal_prompt_store_requests_total", result="miss") == 2
    assert _metric(metrics, "peft_metal_prompt_store_requests_total", result="hit") == 1


def test_concurrent_creates_generate_once(tmp_path, tok):
    app, model, _ = _app(tmp_path, tok)
    calls = _count_calls(model)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            body = {"task": "sentiment", "shots": SHOTS, "num_demonstrations": 0}
            return await asyncio.gather(*(client.post("/v1/prompts", json=body) for _ in range(4)))

    responses = asyncio.run(main())
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.json()["prompt_id"] for r in responses}) == 1
    assert len(calls) == 1


def test_refined_prompts_are_their_own_prompts(served, tok):
    """refine_steps: the PGM's prompt tuned on the shots it read, made once, stored under its own id, and no longer
    text (a refined discrete prompt is read as its tuned embeddings)."""
    from peft_metal import GeneratedPrompt, Refinement
    from peft_metal.metal_prompt.refine import DEFAULT_LR

    client, model, store = served
    plain = _create(client, num_demonstrations=1).json()
    body = {"task": "sentiment", "shots": SHOTS, "num_demonstrations": 1, "refine_steps": 2}
    first = client.post("/v1/prompts?wait=60", json=body)  # a job (tests/test_serving_jobs.py), waited for
    assert first.status_code == 201, first.text
    created = first.json()
    assert created["refine_steps"] == 2 and "text" not in created and created["prompt_id"] != plain["prompt_id"]
    again = client.post("/v1/prompts", json=body)
    assert again.status_code == 200 and again.json()["prompt_id"] == created["prompt_id"]
    info = client.get(f"/v1/prompts/{created['prompt_id']}").json()
    assert info["refinement"] == [{"steps": 2, "lr": DEFAULT_LR, "batch_size": 8, "seed": 0, "num_shots": len(SHOTS) - 1}]
    assert info["status"] == "ready" and "text" not in info
    assert client.get(f"/v1/prompts/{plain['prompt_id']}").json()["refinement"] == []
    stored = store.get(created["prompt_id"])
    with torch.no_grad():
        expected = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1, refinement=Refinement(2))
    assert isinstance(stored, GeneratedPrompt) and torch.equal(stored.embeds, expected.embeds)
    assert _complete(client, created["prompt_id"], prompt="nice", options=OPTIONS).status_code == 200
    for bad in (-1, 101, "2", 1.5):
        response = client.post("/v1/prompts", json={**body, "refine_steps": bad})
        assert response.status_code == 422, (bad, response.text)


def test_non_discrete_prompt_has_no_text(tmp_path, tok):
    app, _, _ = _app(tmp_path, tok, design="prefix")
    with TestClient(app) as client:
        response = _create(client)
        assert response.status_code == 201
        assert "text" not in response.json() and response.json()["design"] == "prefix"
        info = client.get(f"/v1/prompts/{response.json()['prompt_id']}").json()
        assert "text" not in info and "token_ids" not in info


def test_get_and_delete(served):
    client, _, _ = served
    prompt_id = _create(client, num_demonstrations=1).json()["prompt_id"]
    info = client.get(f"/v1/prompts/{prompt_id}")
    assert info.status_code == 200
    row = info.json()
    assert row["task"] == "sentiment" and row["design"] == "discrete" and row["num_tokens"] == K
    assert row["num_demonstrations"] == 1 and "created_at" in row and "hits" in row
    # a discrete prompt is plain text any LM service can use: its tokens, its text and the demonstrations' text
    stored = served[2].get(prompt_id, count_hit=False)
    assert row["token_ids"] == stored.token_ids.tolist() and row["text"] == stored.text
    assert row["demonstrations_text"] == stored.demonstrations_text and stored.demonstrations_text.startswith("Input: ")
    assert client.get(f"/v1/prompts/{prompt_id}").json()["hits"] == row["hits"], "reading the info is not a use"
    assert _complete(client, prompt_id=prompt_id, prompt="ok").status_code == 200
    assert client.delete(f"/v1/prompts/{prompt_id}").status_code == 204
    assert client.get(f"/v1/prompts/{prompt_id}").status_code == 404
    assert client.delete(f"/v1/prompts/{prompt_id}").status_code == 404
    # The cached context went with it: the prompt is no longer served.
    assert _complete(client, prompt_id=prompt_id, prompt="ok").status_code == 404
    for unknown in ("0" * 32, "not-an-id", "..%2F..%2Fetc"):
        assert client.get(f"/v1/prompts/{unknown}").status_code == 404
        assert _complete(client, prompt_id=unknown, prompt="ok").status_code == 404


# -------------------------------------------------------------------------------------------------- completions


def _reference_generation(model, tok, context, text: str, max_new_tokens: int) -> str:
    """What evaluation would answer: greedy decoding from the cached context, cut at the template's stop strings."""
    lm, template = model.base_model.model, model.base_model.template
    query = tok(template.format_query(text), add_special_tokens=False)["input_ids"]
    stop = Sampling(max_new_tokens, stop=lambda t: has_stop(tok.decode(t), template))
    [generation] = generate(lm, context, [query], [stop])
    return cut_generation(tok.decode(generation.tokens, skip_special_tokens=True), template)


def _reference_scores(model, tok, context, text: str, options):
    lm, template = model.base_model.model, model.base_model.template
    query = tok(template.format_query(text), add_special_tokens=False)["input_ids"]
    ids = [tok(template.format_answer(option), add_special_tokens=False)["input_ids"] for option in options]
    return score_options(lm, context, [query], [ids])[0]


@pytest.mark.parametrize("design", ["discrete", "prefix"])
def test_completions_match_evaluation(tmp_path, tok, design):
    app, model, store = _app(tmp_path, tok, design=design)
    with TestClient(app) as client:
        prompt_id = _create(client, num_demonstrations=1).json()["prompt_id"]
        context = prompt_context(model.base_model.model, store.get(prompt_id))
        response = _complete(client, prompt_id, prompt=INPUTS[:3], max_tokens=6)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion" and body["model"] == f"metal:{prompt_id}"
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        for text, choice in zip(INPUTS[:3], body["choices"]):
            assert choice["text"] == _reference_generation(model, tok, context, text, 6)
            assert choice["finish_reason"] in ("stop", "length")
        assert 3 <= body["usage"]["completion_tokens"] <= 18
        assert body["usage"]["stored_prompt_tokens"] == context.length
        single = _complete(client, prompt_id, prompt="nice", max_tokens=6)
        assert single.json()["choices"][0]["text"] == body["choices"][0]["text"]

        scored = _complete(client, prompt_id, prompt=INPUTS[:2], options=OPTIONS)
        assert scored.status_code == 200, scored.text
        for text, choice in zip(INPUTS[:2], scored.json()["choices"]):
            reference = _reference_scores(model, tok, context, text, OPTIONS)
            got = [s["mean_logprob"] for s in choice["option_scores"]]
            assert got == pytest.approx([s.mean_logprob for s in reference], abs=1e-4)
            assert [s["option"] for s in choice["option_scores"]] == OPTIONS
            assert [s["num_tokens"] for s in choice["option_scores"]] == [s.num_tokens for s in reference]
            assert choice["text"] == OPTIONS[max(range(3), key=lambda i: reference[i].mean_logprob)]


def test_plain_model_is_zero_shot_or_icl(served, tok):
    client, model, _ = served
    lm, template = model.base_model.model, model.base_model.template
    zero = _complete(client, prompt="nice", max_tokens=5)
    assert zero.status_code == 200
    assert zero.json()["choices"][0]["text"] == _reference_generation(model, tok, empty_context(), "nice", 5)
    icl = _complete(client, prompt="nice", max_tokens=5, shots=SHOTS)
    assert icl.status_code == 200
    pairs = [(s["input"], s["output"]) for s in SHOTS]
    demos = extend_context(lm, empty_context(), tok(template.format_shots(pairs), add_special_tokens=False)["input_ids"])
    assert icl.json()["choices"][0]["text"] == _reference_generation(model, tok, demos, "nice", 5)
    scored = _complete(client, prompt="nice", options=OPTIONS, shots=SHOTS)
    reference = _reference_scores(model, tok, demos, "nice", OPTIONS)
    got = [s["mean_logprob"] for s in scored.json()["choices"][0]["option_scores"]]
    assert got == pytest.approx([s.mean_logprob for s in reference], abs=1e-4)


def test_sampling_is_seeded(served):
    client, _, _ = served
    prompt_id = _create(client).json()["prompt_id"]
    body = {**_body(client.app, prompt_id, prompt=["nice", "bad"], max_tokens=8, seed=7), "temperature": 1.5}
    first = client.post("/v1/completions", json=body)
    assert first.status_code == 200
    again = client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in first.json()["choices"]]


# ----------------------------------------------------------------------------------------------------- batching


def test_concurrent_requests_are_batched(tmp_path, tok):
    app, _, _ = _app(tmp_path, tok, batch_window_ms=50, max_batch=16)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            prompt_id = (await client.post("/v1/prompts", json={"task": "t", "shots": SHOTS})).json()["prompt_id"]

            def body(text, **extra):
                return _body(app, prompt_id, prompt=text, max_tokens=6, **extra)

            # Unbatched: one request at a time, each a batch of one.
            alone = [(await client.post("/v1/completions", json=body(text))).json() for text in INPUTS]
            alone_scores = [(await client.post("/v1/completions", json=body(t, options=OPTIONS))).json() for t in INPUTS]
            metrics_before = (await client.get("/metrics")).text
            together = await asyncio.gather(*(client.post("/v1/completions", json=body(text)) for text in INPUTS))
            together_scores = await asyncio.gather(
                *(client.post("/v1/completions", json=body(t, options=OPTIONS)) for t in INPUTS)
            )
            metrics_after = (await client.get("/metrics")).text
            return alone, alone_scores, metrics_before, together, together_scores, metrics_after

    alone, alone_scores, before, together, together_scores, after = asyncio.run(main())
    assert _metric(before, "peft_metal_batch_size_max") == 1
    assert _metric(after, "peft_metal_batch_size_max") > 1
    # Sixteen sequential single-input calls, then the concurrent ones in fewer calls than requests.
    calls = _metric(after, "peft_metal_batch_size_count", kind="generate")
    assert calls < 2 * len(INPUTS)
    singles = _metric(after, "peft_metal_batch_size_bucket", kind="generate", le="1")
    assert calls - singles >= 1  # at least one generate call held more than one input
    assert [r.status_code for r in together] == [200] * len(INPUTS)
    assert [r.json()["choices"][0]["text"] for r in together] == [a["choices"][0]["text"] for a in alone]
    for got, expected in zip(together_scores, alone_scores):
        assert got.json()["choices"][0]["text"] == expected["choices"][0]["text"]
        assert [s["mean_logprob"] for s in got.json()["choices"][0]["option_scores"]] == pytest.approx(
            [s["mean_logprob"] for s in expected["choices"][0]["option_scores"]], abs=1e-4
        )


def test_max_batch_one_never_batches(tmp_path, tok):
    app, _, _ = _app(tmp_path, tok, batch_window_ms=0, max_batch=1)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            await asyncio.gather(
                *(client.post("/v1/completions", json=_body(app, prompt=t, max_tokens=2)) for t in INPUTS[:4])
            )
            return (await client.get("/metrics")).text

    metrics = asyncio.run(main())
    assert _metric(metrics, "peft_metal_batch_size_max") == 1
    assert _metric(metrics, "peft_metal_batch_size_count", kind="generate") == 4


# ------------------------------------------------------------------------------------------------------- errors


def test_too_long_is_413(served):
    client, _, _ = served
    prompt_id = _create(client).json()["prompt_id"]
    long_input = "a" * MAX_POSITIONS
    assert _complete(client, prompt_id=prompt_id, prompt=long_input).status_code == 413
    response = _complete(client, prompt_id=prompt_id, prompt="ok", max_tokens=250)
    assert response.status_code == 413 and "context" in _message(response)
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert _complete(client, prompt=["ok", long_input]).status_code == 413
    assert _complete(client, prompt="ok", shots=[{"input": long_input, "output": "y"}]).status_code == 413
    many_long_shots = [{"input": f"word {i} " * 25, "output": "y"} for i in range(4)]  # folded in chunk by chunk
    assert _create(client, shots=many_long_shots).status_code == 201
    one_shot_too_long = [{"input": "word " * 60, "output": "y"}]  # no chunk can hold it
    response = _create(client, shots=one_shot_too_long)
    assert response.status_code == 413 and "over" in _message(response)
    # Within the limit still works afterwards.
    assert _complete(client, prompt_id=prompt_id, prompt="ok", max_tokens=4).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"task": "t", "shots": "good -> positive"},
        {"task": "t", "shots": []},
        {"task": "t", "shots": [{"input": "a"}]},
        {"task": "t", "shots": [{"input": "a", "output": 3}]},
        {"task": "t", "shots": [["a", "b", "c"]]},
        {"task": "t", "shots": SHOTS, "num_demonstrations": 4},
        {"task": "t", "shots": SHOTS, "num_demonstrations": -1},
        {"task": "t", "shots": SHOTS, "num_demonstrations": "1"},
        {"task": "", "shots": SHOTS},
        {"shots": SHOTS},
        {"task": "t", "shots": SHOTS, "unexpected": 1},
    ],
)
def test_malformed_prompt_requests_are_422(served, body):
    client, _, _ = served
    response = client.post("/v1/prompts", json=body)
    assert response.status_code == 422, response.text
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": []},
        {"prompt": 3},
        {"prompt": ["ok", 3]},
        {"prompt": [[1, 2], "ok"]},
        {"prompt": [10**9]},
        {"prompt": [-1]},
        {"prompt": ""},
        {"model": None},
        {"prompt": "ok", "max_tokens": 0},
        {"prompt": "ok", "max_tokens": -1},
        {"prompt": "ok", "temperature": -1},
        {"prompt": "ok", "top_p": 0},
        {"prompt": "ok", "n": 0},
        {"prompt": "ok", "stop": ["a", "b", "c", "d", "e"]},
        {"prompt": "ok", "stop": [""]},
        {"prompt": "ok", "logprobs": 21},
        {"prompt": "ok", "suffix": "x"},
        {"prompt": "ok", "best_of": 3},
        {"prompt": "ok", "presence_penalty": 0.5},
        {"prompt": "ok", "logit_bias": {"5": 1.0}},
        {"prompt": "ok", "options": []},
        {"prompt": "ok", "options": ["a", "a"]},
        {"prompt": "ok", "options": [""]},
        {"prompt": "ok", "options": ["a"], "n": 2},
        {"prompt": "ok", "options": ["a"], "echo": True},
        {"prompt": "ok", "options": ["a"], "stream": True},
        {"prompt": [1, 2], "template": True},
        {"prompt": "ok", "shots": [{"input": "a"}]},
        {"prompt": ["ok"] * 65},
        {"prompt": "ok", "unexpected": 1},
    ],
)
def test_malformed_completion_requests_are_422(served, fields):
    client, _, _ = served
    body = {"model": client.app.state.service.model_name, **fields}
    if "prompt" not in fields:
        body["prompt"] = "ok"
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 422, response.text
    assert _message(response) and response.json()["error"]["type"] == "invalid_request_error"
    assert _complete(client, prompt="ok", max_tokens=2).status_code == 200


def test_unknown_model_and_shots_with_a_stored_prompt(served):
    client, _, _ = served
    response = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "ok"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "GET /v1/models" in _message(response)
    prompt_id = _create(client).json()["prompt_id"]
    response = _complete(client, prompt_id, prompt="ok", shots=SHOTS)
    assert response.status_code == 422 and response.json()["error"]["param"] == "shots"


def test_invalid_json_is_422(served):
    client, _, _ = served
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and _message(response)


def test_a_body_sent_as_a_form_is_told_to_send_json(served):
    """`curl -d '{...}'` without a Content-Type header sends a form: the error says what to send instead."""
    client, _, _ = served
    body = json.dumps({"task": "t", "shots": SHOTS})
    response = client.post("/v1/prompts", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 422
    assert "Content-Type: application/json" in _message(response) and "x-www-form-urlencoded" in _message(response)
    response = client.post("/v1/prompts", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code in (200, 201), response.text


@pytest.mark.parametrize("value, status", [(2, 200), (2.0, 200), (2.5, 422), (True, 422), ("2", 422)])
def test_integers_are_json_schema_integers(served, value, status):
    """JSON has one number type: 2.0 is the integer 2 (as JSON Schema says); 2.5, true and "2" are not integers."""
    client, _, _ = served
    prompt_id = _create(client).json()["prompt_id"]
    response = _complete(client, prompt_id, prompt=["ok"], max_tokens=value, n=value, temperature=1.0, seed=value)
    assert response.status_code == status, response.text
    assert _create(client, num_demonstrations=float(len(SHOTS) - 1)).status_code in (200, 201)


@pytest.mark.parametrize("settings", [{"temperature": 5e-324}, {"top_p": 5e-324}, {"seed": 2**70}, {"seed": -3}])
def test_extreme_sampling_settings_are_served(served, settings):
    """Found by schemathesis: a top_p that float32 rounds to 0 emptied the nucleus (500); seeds are any integer."""
    client, _, _ = served
    response = _complete(client, prompt="ok", max_tokens=3, **{"temperature": 1.0, "seed": 0, **settings})
    assert response.status_code == 200, response.text


def test_method_not_allowed_names_every_method_of_the_path(served):
    """Found by schemathesis: a 405 named only the first route's methods (GET), not DELETE on the same path."""
    client, _, _ = served
    response = client.put("/v1/prompts/abc", json={})
    assert response.status_code == 405
    assert {"GET", "DELETE"} <= {method.strip() for method in response.headers["allow"].split(",")}


def test_api_key(tmp_path, tok):
    app, _, _ = _app(tmp_path, tok, api_key="s3cret")
    with TestClient(app) as client:
        assert _create(client).status_code == 401
        assert _create(client, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _create(client, headers={"Authorization": "s3cret"}).status_code == 401
        response = _complete(client, prompt="ok")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"
        assert client.get(f"/v1/prompts/{'0' * 32}").status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert _create(client, headers=good).status_code == 201
        assert _complete(client, prompt="ok", max_tokens=2, headers=good).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes need no key


def test_damaged_prompt_is_never_served(served):
    client, _, store = served
    prompt_id = _create(client).json()["prompt_id"]
    path = store.prompts_dir / f"{prompt_id}.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    response = _complete(client, prompt_id=prompt_id, prompt="ok")
    assert response.status_code == 409 and "damaged" in _message(response)
    assert client.get("/healthz").status_code == 200
    # Asking for the prompt again makes it anew (the store replaces the damaged file); then it is served.
    assert _create(client).json()["prompt_id"] == prompt_id
    assert _complete(client, prompt_id=prompt_id, prompt="ok", max_tokens=2).status_code == 200


def test_bug_is_500_and_service_stays_up(served, monkeypatch):
    client, _, _ = served
    service = client.app.state.service

    def broken(entry, jobs):
        raise RuntimeError("boom")

    monkeypatch.setattr(service.batcher, "run_batch", broken)
    with TestClient(client.app, raise_server_exceptions=False) as failing:
        response = _complete(failing, prompt="ok")
    assert response.status_code == 500 and "boom" not in response.text and _message(response)
    monkeypatch.undo()
    assert _complete(client, prompt="ok", max_tokens=2).status_code == 200


# ---------------------------------------------------------------------------------------------- health, metrics


def test_healthz(served):
    client, _, _ = served
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["design"] == "discrete" and body["max_context"] == MAX_POSITIONS


def test_metrics(served):
    client, _, _ = served
    prompt_id = _create(client).json()["prompt_id"]
    _create(client)
    _complete(client, prompt_id=prompt_id, prompt=["a", "b"], max_tokens=2)
    _complete(client, prompt_id=prompt_id, prompt="a", options=OPTIONS)
    _complete(client, prompt=[])
    client.get("/nowhere")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    requests = "peft_metal_http_requests_total"
    assert _metric(text, requests, route="/v1/prompts", method="POST", status="201") == 1
    assert _metric(text, requests, route="/v1/prompts", method="POST", status="200") == 1
    assert _metric(text, requests, route="/v1/completions", method="POST", status="200") == 2
    assert _metric(text, requests, route="/v1/completions", method="POST", status="422") == 1
    assert _metric(text, requests, route="unmatched", method="GET", status="404") == 1
    assert "# TYPE peft_metal_http_request_duration_seconds histogram" in text
    assert _metric(text, "peft_metal_http_request_duration_seconds_count", route="/v1/completions", method="POST") == 3
    assert _metric(
        text, "peft_metal_http_request_duration_seconds_bucket", route="/v1/completions", method="POST", le="+Inf"
    ) == 3
    assert _metric(text, "peft_metal_prompt_store_requests_total", result="hit") == 1
    assert _metric(text, "peft_metal_prompt_store_requests_total", result="miss") == 1
    assert _metric(text, "peft_metal_context_cache_requests_total", result="miss") == 1
    assert _metric(text, "peft_metal_context_cache_requests_total", result="hit") == 1
    assert _metric(text, "peft_metal_batch_size_sum", kind="generate") == 2
    assert _metric(text, "peft_metal_batch_size_count", kind="options") == 1
    assert _metric(text, "peft_metal_completion_rows_total", kind="generate") == 2
    for line in text.splitlines():  # every sample line is `name{labels} value`
        assert line.startswith("#") or re.match(r"^[a-z_]+(\{[^}]*\})? [0-9.e+-]+$", line), line


def test_serve_command_arguments(tmp_path):
    from peft_metal.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--store", str(tmp_path / "store")])
    assert (args.model, args.host, args.port, args.api_key_file) == ("smollm2-135m", "127.0.0.1", 8000, None)
    assert (args.batch_window_ms, args.max_batch) == (5.0, 16)
    assert main(["serve", "--store", str(tmp_path / "store"), "--max-batch", "0"]) == 2  # refused before loading


def test_api_key_comes_from_a_file_or_the_environment_never_the_command_line(tmp_path, monkeypatch, capsys):
    from peft_metal.cli import _api_key, _is_loopback, build_parser, main

    store = str(tmp_path / "store")
    assert main(["serve", "--store", store, "--api-key", "s3cret"]) == 2
    assert "visible to every user of the machine" in capsys.readouterr().err
    key_file = tmp_path / "key"
    key_file.write_text("  from-file\n")
    monkeypatch.setenv("PEFT_METAL_API_KEY", "from-env")
    assert _api_key(build_parser().parse_args(["serve", "--store", store, "--api-key-file", str(key_file)])) == "from-file"
    assert _api_key(build_parser().parse_args(["serve", "--store", store])) == "from-env"
    monkeypatch.delenv("PEFT_METAL_API_KEY")
    assert _api_key(build_parser().parse_args(["serve", "--store", store])) is None
    key_file.write_text("\n")
    assert main(["serve", "--store", store, "--api-key-file", str(key_file)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["serve", "--store", store, "--api-key-file", str(tmp_path / "missing")]) == 2
    assert all(_is_loopback(host) for host in ("127.0.0.1", "::1", "localhost", "127.0.0.9"))
    assert not any(_is_loopback(host) for host in ("0.0.0.0", "10.0.0.1", "example.org"))


def test_the_api_key_is_never_logged(tmp_path, tok, caplog):
    app, _, _ = _app(tmp_path, tok, api_key="s3cret-value")
    with caplog.at_level("DEBUG"), TestClient(app) as client:
        assert _create(client, headers={"Authorization": "Bearer s3cret-value"}).status_code == 201
        assert _create(client, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "s3cret-value" not in caplog.text and "wrong" not in caplog.text


def test_request_limits_are_refused_with_the_limit_named(tmp_path, tok):
    app, _, _ = _app(tmp_path, tok, max_body_bytes=2000, max_shots=3, max_request_tokens=40)
    with TestClient(app) as client:
        big = client.post("/v1/prompts", content=b"x" * 2001, headers={"content-type": "application/json"})
        assert big.status_code == 413 and "at most 2000" in _message(big)
        many = _create(client, shots=[{"input": "a", "output": "b"}] * 4)
        assert many.status_code == 422 and "At most 3 shots" in _message(many)
        prompt_id = _create(client, shots=SHOTS[:3]).json()["prompt_id"]
        long = _complete(client, prompt_id=prompt_id, prompt=["word " * 5] * 3)
        assert long.status_code == 413 and "at most 40 tokens per request" in _message(long)
        assert long.json()["error"]["param"] == "prompt"
        # Generation counts too: three choices of 16 new tokens are 48 tokens to write.
        wordy = _complete(client, prompt_id=prompt_id, prompt="ok", max_tokens=16, n=3, temperature=1.0)
        assert wordy.status_code == 413 and wordy.json()["error"]["param"] == "max_tokens", wordy.text
        assert _complete(client, prompt_id=prompt_id, prompt="ok", max_tokens=4).status_code == 200

        def chunked():
            yield b'{"task": "t", '
            yield b'"shots": [["a", "b"]]}'

        assert client.post("/v1/prompts", content=chunked(), headers={"content-type": "application/json"}).status_code == 411
    with pytest.raises(ValueError, match="max_shots must be a positive int"):
        _app(tmp_path / "other", tok, max_shots=0)


def test_open_streams_are_bounded(tmp_path, tok):
    """A stream slot is taken before any byte is sent (429 when none is free) and given back when the stream ends or
    never starts."""
    from peft_metal.serving.errors import TooManyStreamsError
    from peft_metal.serving.schemas import CompletionRequest

    app, _, _ = _app(tmp_path, tok, max_streams=1)
    service = app.state.service
    request = CompletionRequest(**_body(app, prompt="ok", max_tokens=2, stream=True))

    async def main():
        chunks, release = await service.open_stream(request)
        with pytest.raises(TooManyStreamsError, match="at most 1"):
            await service.open_stream(request)
        release()  # the client went away before the first byte: the generator never ran
        chunks, _ = await service.open_stream(request)
        texts = [chunk async for chunk in chunks]  # run to the end: the slot comes back by itself
        assert texts[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert service.health()["open_streams"] == 0

    asyncio.run(main())
    with TestClient(app) as client:
        service._open_streams = 1  # as if another client held the only slot
        response = client.post("/v1/completions", json=_body(app, prompt="ok", stream=True))
        assert response.status_code == 429 and response.json()["error"]["code"] == "too_many_streams"
        service._open_streams = 0
        streamed = client.post("/v1/completions", json=_body(app, prompt="ok", max_tokens=2, stream=True))
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        assert service.health()["open_streams"] == 0


def test_models_lists_the_base_model_and_every_stored_prompt(served):
    client, _, _ = served
    first = _create(client).json()["prompt_id"]
    second = _create(client, task="other").json()["prompt_id"]
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    ids = [model["id"] for model in listing["data"]]
    assert ids[1:] == [f"metal:{first}", f"metal:{second}"] and ids[0] not in ids[1:]
    assert all(model["object"] == "model" and isinstance(model["created"], int) for model in listing["data"])
    client.delete(f"/v1/prompts/{first}")
    assert [model["id"] for model in client.get("/v1/models").json()["data"]][1:] == [f"metal:{second}"]


@pytest.mark.parametrize("value, status", [(1, 200), (0.5, 200), (True, 422), ("0.5", 422)])
def test_numbers_are_json_schema_numbers(served, value, status):
    """Found by schemathesis: `temperature: false` was taken as 0 (pydantic's lax floats); a number is 1 or 0.5."""
    client, _, _ = served
    response = _complete(client, prompt="ok", max_tokens=2, temperature=value, top_p=value)
    assert response.status_code == status, response.text
