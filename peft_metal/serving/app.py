"""The HTTP face of the service: `create_app` builds the service and an app with its limits, error handlers and routes.

    app = create_app(model, tokenizer, PromptStore("prompts/"), api_key=None, batch_window_ms=5, max_batch=16)

Routes (JSON; `/v1/*` need `Authorization: Bearer KEY` when an api key is set):

* `POST /v1/prompts` `{"task", "shots": [{"input", "output"}], "num_demonstrations": 0, "refine_steps": 0}`: 201
  with the new prompt's id, its model name `metal:<id>`, design and size (and `text` for prompts of vocabulary tokens),
  or 200 with `cached: true` when the same task, shots, split and refinement were stored before (the PGM runs once per
  distinct request). With `refine_steps` the PGM's prompt is stored (as if refine_steps were 0), then tuned on the
  shots the PGM read by a job, one step at a time between completions: 202 with its status (`unrefined_model`, the
  prompt before refinement, can be used meanwhile), or 201 if it ends within `?wait=` seconds (at most 600).
* `GET /v1/prompts/{id}`: its status, `refining` (steps done), `ready` (with the store's row, and `token_ids`/`text`
  for token prompts), `failed` or `cancelled` (with the reason); `POST /v1/prompts/{id}/cancel` stops a refinement;
  `DELETE`: 204 (removes the prompt, or cancels its refinement), or 404.
* `POST /v1/completions`: OpenAI's completions (`model` is the base model or `metal:<prompt_id>`; `prompt`,
  `max_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed`, `echo`, `logprobs`, `stream` as server-sent events)
  with three extensions: `options` (score answers instead of generating), `template` (format prompts as the PGM's
  shots are formatted) and `shots` (in-context demonstrations for the base model).
* `GET /v1/models`: the base model, and each stored prompt as `metal:<prompt_id>`.
* `GET /healthz`, `GET /metrics` (Prometheus text).

Errors come in OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`: 400/411/413/422 bad or too
large requests, 401 wrong or missing api key, 404 unknown prompt, model or route, 409 a stored prompt that is damaged
or made for another base model (never served), a prompt not ready (being refined, failed, cancelled) or a cancel of
one not being refined, 429 too many open streams or refinement jobs (with Retry-After), 501 prompt creation without a
PGM, 500 bugs only.

Limits (each a `create_app` setting and a `peft-metal serve` flag): a request body of at most 1 MiB (413; a body sent
without Content-Length gets 411), 512 shots per prompt (422), 64 prompts per completion request (422), 32,768
tokens read and generated per completion request (413), 16 open streams and 2 refinement jobs (429).

Where each part lives: the routes in `routes/` (one `APIRouter` per group, sharing `routes/dependencies.py`: the
service and the API key check, read from `app.state`), the error table and handlers in `http_errors.py`, the request
bodies in `schemas.py`; here only the two middlewares (body size, request metrics) and the assembly.
"""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from fastapi import Depends, FastAPI, Request

from .http_errors import ERROR_RESPONSES, error_response, install_error_handlers
from .routes import completions, models, operations, prompts
from .routes.dependencies import authorize
from .service import Service
from .store import PromptStore

DEFAULT_MAX_BODY_BYTES = 1 << 20  # a request body: 1 MiB


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    app.state.service.close()


async def limit_body_size(request: Request, call_next):
    """413 for a body over the limit, told by its Content-Length before anything is read; a body sent without
    one (chunked) gets 411, since its size could only be learned by reading it."""
    declared = request.headers.get("content-length")
    max_body_bytes = request.app.state.max_body_bytes
    if declared is None and request.method in ("POST", "PUT", "PATCH"):
        return error_response(411, "Send the request body with a Content-Length.", code="length_required")
    if declared is not None and not declared.isdigit():
        return error_response(400, f"Content-Length {declared!r} is not a byte count.", code="bad_content_length")
    if declared is not None and int(declared) > max_body_bytes:
        return error_response(
            413, f"Request body of {declared} bytes; this server takes at most {max_body_bytes} per request.",
            code="body_too_large",
        )
    return await call_next(request)


async def count_requests(request: Request, call_next):
    """Every request in the service's metrics, by route template (`unmatched` when no route took it)."""
    start = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        route = request.scope.get("route")
        request.app.state.service.metrics.request(
            getattr(route, "path", "unmatched"), request.method, status, time.perf_counter() - start
        )


def create_app(
    model: Any,
    tokenizer: Any,
    store: Union[PromptStore, str, os.PathLike],
    api_key: Optional[str] = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    **settings: Any,
) -> FastAPI:
    """The FastAPI app serving `model` (a MetaL-Prompt PeftModel; a plain LM serves the base model only).
    `settings` are `Service`'s keyword arguments: batch_window_ms, max_batch, context_cache_size, model_name,
    max_shots, max_request_tokens, max_streams, max_refine_jobs."""
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}.")
    api_key = api_key or None
    service = Service(model, tokenizer, store if isinstance(store, PromptStore) else PromptStore(store), **settings)

    app = FastAPI(
        title="peft-metal", description="MetaL-Prompt serving: stored prompts, OpenAI-compatible completions.",
        lifespan=lifespan, responses=ERROR_RESPONSES,
    )
    app.state.service, app.state.api_key, app.state.max_body_bytes = service, api_key, max_body_bytes
    app.middleware("http")(limit_body_size)
    app.middleware("http")(count_requests)  # added last, so it runs first: it counts the 411s and 413s too
    install_error_handlers(app)

    key_check = [Depends(authorize)] if api_key is not None else []
    for group in (prompts, completions, models):
        app.include_router(group.router, dependencies=key_check)
    app.include_router(operations.router)
    return app
