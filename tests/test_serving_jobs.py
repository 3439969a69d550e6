"""Refinement as a job in the HTTP service, with tiny models: 202 and a status polled to ready, completions served
between its steps, 409 for the refined prompt until it is ready (its unrefined prompt usable meanwhile), cancel and
DELETE, at most --max-refine-jobs at once (429 with Retry-After), and a restart that reports the job as failed and
stores no half prompt."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import SERVED_SHOTS, build_tokenizer, make_pgm
from fastapi.testclient import TestClient

from peft_metal import Refinement
from peft_metal.metal_prompt.refine import PromptTuning
from peft_metal.serving.app import create_app
from peft_metal.serving.store import PromptStore

SHOTS = SERVED_SHOTS
OPTIONS = ["positive", "negative"]
STEP_S = 0.1  # each refinement step is slowed by this much, so a job lasts long enough to act on it meanwhile

pytestmark = pytest.mark.one_thread  # tiny models (conftest)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def slow_steps(monkeypatch):
    step = PromptTuning.step

    def slow(self):
        time.sleep(STEP_S)
        return step(self)

    monkeypatch.setattr(PromptTuning, "step", slow)


def _client(tmp_path, tok, **settings):
    model = make_pgm("llama", "discrete")
    return TestClient(create_app(model, tok, PromptStore(tmp_path / "store"), **settings)), model


def _refine(client, steps, shots=SHOTS, query=""):
    return client.post(f"/v1/prompts{query}", json={"task": "sentiment", "shots": shots, "refine_steps": steps})


def _until_done(client, prompt_id, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while (status := client.get(f"/v1/prompts/{prompt_id}").json())["status"] == "refining":
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
    return status


def _options(client, model):
    return client.post("/v1/completions", json={"model": model, "prompt": "nice", "options": OPTIONS, "template": True})


def test_a_refinement_is_a_job_polled_until_ready(tmp_path, tok):
    with _client(tmp_path, tok)[0] as client:
        accepted = _refine(client, 3)
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert job["status"] == "refining" and job["refine_steps"] == 3 and job["unrefined_model"].startswith("metal:")
        assert job["model"] == f"metal:{job['prompt_id']}" and job["unrefined_model"] != job["model"]
        ready = _until_done(client, job["prompt_id"])
        assert ready["status"] == "ready" and ready["refinement"][0]["steps"] == 3
        again = _refine(client, 3)
        assert again.status_code == 200 and again.json()["cached"] is True
        assert _options(client, job["model"]).status_code == 200
        metrics = client.get("/metrics").text
        assert 'peft_metal_refine_job_duration_seconds_count{outcome="ready"} 1' in metrics
        assert "peft_metal_refine_step_duration_seconds_count 3" in metrics
        assert "peft_metal_refine_jobs 0" in metrics


def test_waiting_gives_the_refined_prompt(tmp_path, tok):
    client, model = _client(tmp_path, tok)
    with client:
        created = _refine(client, 2, query="?wait=60")
        assert created.status_code == 201, created.text
        stored = client.app.state.service.store.get(created.json()["prompt_id"])
    with torch.no_grad():
        expected = model.generate_prompt(SHOTS, tokenizer=tok, refinement=Refinement(2))
    assert torch.equal(stored.embeds, expected.embeds)


def test_completions_are_served_between_refinement_steps(tmp_path, tok, slow_steps):
    """A completion sent while a 30-step refinement runs answers within about a step, long before the job ends; the
    refined prompt answers 409 with its status until ready, its unrefined prompt only when asked for by name."""
    with _client(tmp_path, tok)[0] as client:
        job = _refine(client, 30).json()
        for _ in range(3):
            start = time.perf_counter()
            unrefined = _options(client, job["unrefined_model"])
            waited = time.perf_counter() - start
            assert unrefined.status_code == 200, unrefined.text
            assert waited < 4 * STEP_S, waited
        refused = _options(client, job["model"])
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "prompt_not_ready"
        error = refused.json()["error"]
        assert error["param"] == "model" and "being refined" in error["message"]
        assert job["unrefined_model"] in error["message"]
        status = client.get(f"/v1/prompts/{job['prompt_id']}").json()
        assert status["status"] == "refining" and 0 < status["steps_done"] < 30
        assert _until_done(client, job["prompt_id"])["status"] == "ready"
        assert _options(client, job["model"]).status_code == 200


def test_cancel_and_delete_stop_a_job_and_store_nothing(tmp_path, tok, slow_steps):
    with _client(tmp_path, tok)[0] as client:
        store = client.app.state.service.store
        job = _refine(client, 50).json()
        cancelled = client.post(f"/v1/prompts/{job['prompt_id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        status = client.get(f"/v1/prompts/{job['prompt_id']}").json()
        assert status["status"] == "cancelled" and "cancelled by a client" in status["reason"]
        assert job["prompt_id"] not in store
        refused = _options(client, job["model"])
        assert refused.status_code == 409 and "cancelled" in refused.json()["error"]["message"]
        again = client.post(f"/v1/prompts/{job['prompt_id']}/cancel")
        assert again.status_code == 409 and again.json()["error"]["param"] == "prompt_id"
        assert "cancelled" in again.json()["error"]["message"]
        unknown = client.post(f"/v1/prompts/{'0' * 32}/cancel")
        assert unknown.status_code == 404

        job = _refine(client, 50).json()  # the same request again: refined anew
        assert client.get(f"/v1/prompts/{job['prompt_id']}").json()["status"] == "refining"
        assert client.delete(f"/v1/prompts/{job['prompt_id']}").status_code == 204
        assert client.get(f"/v1/prompts/{job['prompt_id']}").status_code == 404
        assert job["prompt_id"] not in store and store.verify()["orphans"] == []
        unrefined_id = job["unrefined_model"].removeprefix("metal:")
        ready = client.post(f"/v1/prompts/{unrefined_id}/cancel")
        assert ready.status_code == 409 and "is ready" in ready.json()["error"]["message"]


def test_at_most_max_refine_jobs_then_429_with_retry_after(tmp_path, tok, slow_steps):
    with _client(tmp_path, tok, max_refine_jobs=1)[0] as client:
        first = _refine(client, 50)
        assert first.status_code == 202
        refused = _refine(client, 50, shots=SHOTS[:3])
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "too_many_refine_jobs" and error["param"] == "refine_steps"
        assert "at most 1 prompts at once (--max-refine-jobs)" in error["message"]
        joined = _refine(client, 50)  # the same job again is no new job
        assert joined.status_code == 202 and joined.json()["prompt_id"] == first.json()["prompt_id"]
        metrics = client.get("/metrics").text
        assert "peft_metal_refine_jobs 1" in metrics and "peft_metal_refine_jobs_refused_total 1" in metrics
        assert client.delete(f"/v1/prompts/{first.json()['prompt_id']}").status_code == 204
        assert _refine(client, 50, shots=SHOTS[:3]).status_code == 202


def test_bad_inputs_name_the_field_and_the_limit(tmp_path, tok):
    with _client(tmp_path, tok)[0] as client:
        too_many = _refine(client, 101)
        assert too_many.status_code == 422 and too_many.json()["error"]["param"] == "refine_steps"
        assert "100" in too_many.json()["error"]["message"]
        too_long = _refine(client, 2, query="?wait=601")
        assert too_long.status_code == 422 and too_long.json()["error"]["param"] == "wait"
        assert "600" in too_long.json()["error"]["message"]
        assert _refine(client, 2, query="?wait=0").status_code == 422
        assert len(client.app.state.service.store) == 0  # refused before anything was made


def test_a_restart_during_a_job_reports_it_failed_and_stores_no_half_prompt(tmp_path, tok, slow_steps):
    with _client(tmp_path, tok)[0] as client:
        job = _refine(client, 20).json()
        time.sleep(3 * STEP_S)
    # the server stopped mid-job; a new one on the same store:
    with _client(tmp_path, tok)[0] as client:
        store = client.app.state.service.store
        status = client.get(f"/v1/prompts/{job['prompt_id']}").json()
        assert status["status"] == "failed" and "the server stopped after" in status["reason"]
        assert "send the same request again" in status["reason"]
        assert job["prompt_id"] not in store
        report = store.verify()
        assert report["damaged"] == {} and report["orphans"] == [] and report["ok"] == [job["unrefined_model"][6:]]
        refused = _options(client, job["model"])
        assert refused.status_code == 409 and "failed" in refused.json()["error"]["message"]
        redone = _refine(client, 20)
        assert redone.status_code == 202 and redone.json()["prompt_id"] == job["prompt_id"]
        assert _until_done(client, job["prompt_id"])["status"] == "ready"


def test_completions_are_served_between_the_pgm_passes_of_a_long_prompt(tmp_path, tok, monkeypatch):
    """A prompt made from 200 shots (chunks folded in one PGM pass each) does not hold completions back for all its
    passes: one sent meanwhile answers within about a pass."""
    from peft_metal.metal_prompt.model import MetaLPromptModel

    run_pgm = MetaLPromptModel._run_pgm
    pass_s = 3 * STEP_S  # long against a tiny completion even on a loaded machine; about 20 passes in all

    def slow(self, *args, **kwargs):
        time.sleep(pass_s)
        return run_pgm(self, *args, **kwargs)

    monkeypatch.setattr(MetaLPromptModel, "_run_pgm", slow)
    shots = [{"input": f"w{i % 10}{i % 7}", "output": "even" if i % 2 == 0 else "odd"} for i in range(200)]
    with _client(tmp_path, tok)[0] as client, ThreadPoolExecutor(1) as pool:
        creating = pool.submit(client.post, "/v1/prompts", json={"task": "parity", "shots": shots})
        time.sleep(2 * pass_s)
        start = time.perf_counter()
        plain = _options(client, client.app.state.service.model_name)
        waited = time.perf_counter() - start
        assert plain.status_code == 200 and waited < 4 * pass_s, waited
        assert not creating.done()  # the prompt's passes were still going on
        assert creating.result().status_code == 201
