"""The service as OpenAI clients see it: the real `openai` package and lm-evaluation-harness's `local-completions`
against `create_app` served by uvicorn on loopback, with a tiny model; answers equal the project's own reading."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SERVED_SHOTS, make_pgm, serve_on_loopback

from peft_metal.data import Example, Task
from peft_metal.evaluation import evaluate
from peft_metal.inference import Sampling, empty_context, generate, prompt_context, score_options, score_tokens
from peft_metal.serving.app import create_app
from peft_metal.serving.store import PromptStore

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

API_KEY = "test-key"
SHOTS = SERVED_SHOTS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`create_app` under uvicorn on 127.0.0.1, as `peft-metal serve` runs it; yields (base url, model, store)."""
    torch.set_num_threads(1)
    model = make_pgm("llama", "prefix")
    from conftest import build_tokenizer

    tok = build_tokenizer()
    store = PromptStore(tmp_path_factory.mktemp("store"))
    app = create_app(model, tok, store, api_key=API_KEY, model_name="tiny-llama")
    with serve_on_loopback(app) as url:
        yield url, model, tok, store


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def prompt_id(server):
    import httpx

    response = httpx.post(
        f"{server[0]}/v1/prompts", json={"task": "sentiment", "shots": SHOTS}, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["model"] == f"metal:{response.json()['prompt_id']}"
    return response.json()["prompt_id"]


def _lm(server):
    return server[1].base_model.model


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_models_list(client, prompt_id):
    ids = [model.id for model in client.models.list()]
    assert ids[0] == "tiny-llama" and f"metal:{prompt_id}" in ids


@pytest.mark.parametrize("stored", [False, True])
def test_completion_equals_greedy_reading(server, client, prompt_id, stored):
    lm, tok, store = _lm(server), server[2], server[3]
    context = prompt_context(lm, store.get(prompt_id)) if stored else empty_context()
    model = f"metal:{prompt_id}" if stored else "tiny-llama"
    text = "Input: nice\nOutput:"
    result = client.completions.create(model=model, prompt=text, max_tokens=6, temperature=0)
    [expected] = generate(lm, context, [_ids(tok, text)], [Sampling(6)])
    assert result.object == "text_completion" and result.model == model
    assert result.choices[0].text == tok.decode(expected.tokens)
    assert result.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert result.usage.prompt_tokens == len(_ids(tok, text))
    assert result.usage.completion_tokens == len(expected.tokens)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_stream_sends_the_same_text(client, prompt_id):
    kwargs = dict(model=f"metal:{prompt_id}", prompt=["Input: nice\nOutput:", "Input: dull\nOutput:"], max_tokens=8,
                  temperature=0)
    whole = client.completions.create(**kwargs)
    pieces = {0: "", 1: ""}
    finish = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert [pieces[0], pieces[1]] == [c.text for c in whole.choices]
    assert [finish[0], finish[1]] == [c.finish_reason for c in whole.choices]


def test_stop_n_and_seeded_sampling(client):
    greedy = client.completions.create(model="tiny-llama", prompt="Input: x\nOutput:", max_tokens=10, temperature=0)
    text = greedy.choices[0].text
    assert len(text) >= 3
    stopped = client.completions.create(model="tiny-llama", prompt="Input: x\nOutput:", max_tokens=10, temperature=0,
                                        stop=[text[2]])
    assert stopped.choices[0].text == text[: text.index(text[2])] and stopped.choices[0].finish_reason == "stop"
    sampled = client.completions.create(model="tiny-llama", prompt=["a", "b"], max_tokens=5, temperature=1.0, n=3, seed=5)
    assert [c.index for c in sampled.choices] == list(range(6))
    again = client.completions.create(model="tiny-llama", prompt=["a", "b"], max_tokens=5, temperature=1.0, n=3, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]


def test_echo_logprobs_equal_the_projects_scores(server, client, prompt_id):
    """`echo` with `max_tokens: 0` scores the text sent: its continuation's log-probabilities sum to what the
    project's own option scoring gives after the same context."""
    lm, tok, store = _lm(server), server[2], server[3]
    query, option = _ids(tok, "Input: nice\nOutput:"), _ids(tok, " positive")
    for model, context in (("tiny-llama", empty_context()), (f"metal:{prompt_id}", prompt_context(lm, store.get(prompt_id)))):
        result = client.completions.create(model=model, prompt=query + option, max_tokens=0, echo=True, logprobs=2)
        logprobs = result.choices[0].logprobs
        assert result.choices[0].text == tok.decode(query + option)
        assert len(logprobs.tokens) == len(query + option) and logprobs.token_logprobs[0] is None
        assert logprobs.text_offset == list(range(len(query + option)))  # one character per token here
        assert all(len(top) == 2 for top in logprobs.top_logprobs[1:])
        [[expected]] = score_options(lm, context, [query], [[option]])
        assert sum(logprobs.token_logprobs[len(query):]) == pytest.approx(expected.sum_logprob, abs=1e-4)
        per_token = score_tokens(lm, context, query + option)
        assert logprobs.token_logprobs[1:] == pytest.approx([t.logprob for t in per_token[1:]], abs=1e-4)
    # echo with generation: the prompt's tokens, then the new ones
    text = "Input: a\nOutput:"
    both = client.completions.create(model="tiny-llama", prompt=text, max_tokens=3, echo=True, logprobs=0, temperature=0)
    assert both.choices[0].text.startswith(tok.decode(_ids(tok, text)))
    assert len(both.choices[0].logprobs.tokens) >= len(_ids(tok, text)) + 1


def test_options_extension(client):
    result = client.completions.create(
        model="tiny-llama", prompt="nice", max_tokens=1, extra_body={"options": ["positive", "negative"], "template": True}
    )
    choice = result.choices[0].model_dump()
    assert choice["text"] in ("positive", "negative")
    scores = {s["option"]: s["mean_logprob"] for s in choice["option_scores"]}
    assert choice["text"] == max(scores, key=scores.get)


def test_errors_come_in_openais_envelope(server, client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="hi")
    assert missing.value.body["code"] == "model_not_found" and "GET /v1/models" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="metal:" + "0" * 32, prompt="hi")
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.completions.create(model="tiny-llama", prompt="hi", n=2, extra_body={"options": ["a"]})
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.APIStatusError) as too_long:
        client.completions.create(model="tiny-llama", prompt="x" * 300)
    assert too_long.value.status_code == 413 and too_long.value.body["code"] == "context_length_exceeded"
    wrong_key = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()


def test_lm_eval_local_completions_scores_as_peft_metal_eval(server, prompt_id, tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` model, pointed at the server, on a multiple-choice task defined
    from local files: its accuracy (summed log-likelihood) equals `peft-metal eval`'s on the same examples, for the
    plain LM and for a stored prompt."""
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    url, model, tok, store = server
    words = ["nice", "dull", "fine", "so bad", "great fun", "awful", "ok", "meh", "superb", "boring"]
    examples = [Example(w, "positive" if i % 2 == 0 else "negative", options=("positive", "negative")) for i, w in enumerate(words)]
    rows = tmp_path / "test.jsonl"
    rows.write_text("".join(json.dumps({"input": e.input, "options": list(e.options), "label": e.options.index(e.output)}) + "\n" for e in examples))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_sentiment.yaml").write_text(
        "task: local_sentiment\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {rows}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"Input: {{input}}\\nOutput:\"\n"
        "doc_to_choice: \"{{options}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    tok.save_pretrained(tmp_path / "tokenizer")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    task = Task(name="local_sentiment", examples=examples)
    for served_model, method in (("tiny-llama", "zero_shot"), (f"metal:{prompt_id}", None)):
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": served_model, "base_url": f"{url}/v1/completions", "tokenizer": str(tmp_path / "tokenizer"),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_retries": 1},
            tasks=["local_sentiment"], task_manager=manager, num_fewshot=0, log_samples=False,
        )
        got = results["results"]["local_sentiment"]["acc,none"]
        if method == "zero_shot":
            [record] = evaluate(model, tok, [task], ["zero_shot"], shots=0, queries=len(examples), seed=0, progress=False)
            expected = record["acc"]  # lm-eval's acc: the option with the largest summed log-likelihood
        else:  # the stored prompt read before every query, options chosen by their summed log-likelihood
            lm = _lm(server)
            context = prompt_context(lm, store.get(prompt_id))
            hits = 0
            for example in examples:
                query = _ids(tok, f"Input: {example.input}\nOutput:")
                scores = score_options(lm, context, [query], [[_ids(tok, " " + o) for o in example.options]])[0]
                hits += example.options[max(range(2), key=lambda i: scores[i].sum_logprob)] == example.output
            expected = hits / len(examples)
        assert got == pytest.approx(expected)
