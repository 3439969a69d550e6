"""Schemathesis hooks for fuzzing the HTTP API (`SCHEMATHESIS_HOOKS=schemathesis_hooks`, with tests/ on the path).

The OpenAPI schema states every rule about a single field; the rules that tie fields together, or depend on the
model being served, cannot be written in it. A schema-valid request that breaks one of those is rightly refused with
422 or 413 (or 409/429 when the server's state refuses it, a refinement job running), so its "schema-valid request
rejected" failure is dropped here, but only when the request really breaks a rule listed below and the refusal names
it. Every other rejection of schema-valid data stays a failure, and the run's report counts what was dropped. The
rules are restated from the service's documentation, not imported from it, so a rule the service stops enforcing (or
starts enforcing without saying) shows up as a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import schemathesis

# The tiny test model's vocabulary unless the runner says otherwise (benchmarks/fuzz_api.py sets it for SmolLM2).
VOCAB_SIZE = int(os.environ.get("PEFT_METAL_FUZZ_VOCAB_SIZE", "128"))
# Model names the server knows (the base model, metal:<id> of prompts stored before the run): a generated name is
# swapped for one of them most of the time, so completions reach the model rather than a 404.
KNOWN_MODELS = [name for name in os.environ.get("PEFT_METAL_FUZZ_MODELS", "").split(",") if name]
MAX_SHOTS = 512
TOO_LARGE_CODES = {"context_length_exceeded", "request_too_large"}  # depend on the model's context and tokenizer
# Refusals that depend on what the server is doing, not on the request: refinement jobs already running (429 with
# Retry-After), a prompt still being refined or whose refinement failed or was cancelled (409), a cancel of a prompt
# that is not being refined (409), streams already open (429).
STATE_CODES = {"too_many_refine_jobs", "prompt_not_ready", "not_refining", "too_many_streams"}


def _prompt_rules(body: dict[str, Any]) -> Iterator[str]:
    shots, demonstrations = body.get("shots"), body.get("num_demonstrations", 0)
    if isinstance(shots, list) and len(shots) > MAX_SHOTS:
        yield "shots"
    if isinstance(shots, list) and _is_number(demonstrations) and demonstrations >= len(shots):
        yield "num_demonstrations"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON's one number type: 3 or 3.0


def _texts_and_ids(prompt: Any) -> tuple[list[str], list[list[int]]]:
    if isinstance(prompt, str):
        return [prompt], []
    if prompt and all(_is_number(item) for item in prompt):
        return [], [prompt]
    return [p for p in prompt if isinstance(p, str)], [p for p in prompt if isinstance(p, list)]


def _completion_rules(body: dict[str, Any]) -> Iterator[str]:
    n, stream, options = body.get("n", 1), body.get("stream", False), body.get("options")
    if body.get("best_of") not in (None, n):
        yield "best_of"
    if body.get("shots") is not None and str(body.get("model", "")).startswith("metal:"):
        yield "shots"
    texts, ids = _texts_and_ids(body.get("prompt", ""))
    if ids and body.get("template"):
        yield "prompt"
    if any(token >= VOCAB_SIZE for item in ids for token in item):
        yield "prompt"
    if "" in texts and not body.get("template") and not body.get("shots"):
        yield "prompt"  # no tokens to read
    if stream and body.get("logprobs") is not None:
        yield "logprobs"
    if options is not None:
        conflicts = {"stream": stream, "echo": body.get("echo"), "logprobs": body.get("logprobs") is not None, "n": n > 1}
        yield from (name for name, conflict in conflicts.items() if conflict)
    elif body.get("max_tokens") == 0 and not body.get("echo"):
        yield "max_tokens"
    if body.get("calibrate"):
        if options is None or not str(body.get("model", "")).startswith("metal:"):
            yield "calibrate"
        elif not body.get("template"):
            yield "template"
        else:  # the stored prompt's state: made with calibrate (its prior recorded), and its shots' labels
            yield from ("calibrate", "options")


RULES = {"/v1/prompts": _prompt_rules, "/v1/completions": _completion_rules}


def breaks_cross_field_rule(path: str, body: Any, error: dict[str, Any]) -> bool:
    """Whether a schema-valid `body` sent to `path` breaks a rule the schema cannot state, the one `error` names."""
    if error.get("code") in TOO_LARGE_CODES | STATE_CODES:
        return True
    rules = RULES.get(path)
    return rules is not None and isinstance(body, dict) and error.get("param") in set(rules(body))


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure except a rejection of schema-valid data that a cross-field rule explains."""
    if failure.code != "ST202" or response.status_code not in (409, 413, 422, 429):
        return True
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return True
    return not breaks_cross_field_rule(case.operation.path, case.body, error)


@schemathesis.hook("map_body").apply_to(path="/v1/completions")
def known_model_names(context, body: Any) -> Any:
    """Swap a generated model name for a served one (unless it picks the generated one), so completions reach the model."""
    if not KNOWN_MODELS or not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return body
    choice = len(body["model"]) % (len(KNOWN_MODELS) + 1)
    return body if choice == len(KNOWN_MODELS) else {**body, "model": KNOWN_MODELS[choice]}


def _follow_the_rules(body: dict[str, Any]) -> dict[str, Any]:
    """The body changed, within the schema, so that it breaks none of the cross-field rules above."""
    body = dict(body)
    if body.get("best_of") is not None:
        body["best_of"] = body.get("n", 1)
    texts, ids = _texts_and_ids(body.get("prompt", ""))
    if ids:
        body["template"] = False
        prompt = body["prompt"]
        wrap = lambda tokens: [int(token) % VOCAB_SIZE for token in tokens]  # noqa: E731
        body["prompt"] = wrap(prompt) if ids == [prompt] else [wrap(p) if isinstance(p, list) else p for p in prompt]
    if "" in texts:
        body["template"] = True
    if str(body.get("model", "")).startswith("metal:"):
        body.pop("shots", None)
    if body.get("options") is not None:
        body.update(stream=False, echo=False, logprobs=None, n=1, best_of=None)
    elif body.get("stream"):
        body["logprobs"] = None
    if body.get("options") is None and body.get("max_tokens") == 0:
        body["echo"] = True
    return body


@schemathesis.hook("map_case").apply_to(path="/v1/completions")
def mostly_follow_the_rules(context, case):
    """Half of the schema-valid completions are made to follow the cross-field rules, so they reach the model
    instead of being refused (schemathesis generates fields independently, and most combinations break a rule)."""
    positive = case.meta is not None and case.meta.generation.mode.name == "POSITIVE"
    if positive and isinstance(case.body, dict) and len(repr(case.body)) % 2 == 0:
        case.body = _follow_the_rules(case.body)
    return case
