"""The HTTP face of the service: routes, limits, authentication, and one table from domain errors to status codes.

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
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..inference import ContextTooLongError
from .errors import (
    IncompatiblePromptError,
    InvalidRequestError,
    ModelNotFoundError,
    NoPGMError,
    NotRefiningError,
    PromptNotReadyError,
    RequestTooLargeError,
    ServiceError,
    TooManyJobsError,
    TooManyStreamsError,
)
from .schemas import (
    MAX_WAIT_S,
    CompletionRequest,
    CompletionResponse,
    CreatePromptRequest,
    ErrorResponse,
    ModelList,
    PromptCreated,
    PromptStatus,
    as_shots,
)
from .service import ACCEPTED, CACHED, Service
from .store import DamagedPromptError, PromptNotFoundError, PromptStore

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20  # a request body: 1 MiB

# Domain error -> (status, OpenAI error type, code). The first matching class wins.
ERROR_STATUS: list[tuple[type[Exception], int, str, str]] = [
    (PromptNotFoundError, 404, "not_found_error", "prompt_not_found"),
    (ModelNotFoundError, 404, "not_found_error", "model_not_found"),
    (DamagedPromptError, 409, "conflict_error", "prompt_damaged"),
    (IncompatiblePromptError, 409, "conflict_error", "prompt_incompatible"),
    (PromptNotReadyError, 409, "conflict_error", "prompt_not_ready"),
    (NotRefiningError, 409, "conflict_error", "not_refining"),
    (ContextTooLongError, 413, "invalid_request_error", "context_length_exceeded"),
    (RequestTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (TooManyStreamsError, 429, "rate_limit_error", "too_many_streams"),
    (TooManyJobsError, 429, "rate_limit_error", "too_many_refine_jobs"),
    (NoPGMError, 501, "not_implemented_error", "no_pgm"),
    (InvalidRequestError, 422, "invalid_request_error", "invalid_request"),
]
STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error"}
ERROR_RESPONSES: dict[Union[int, str], dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "body that is not JSON"), (401, "missing or wrong API key"), (404, "unknown prompt or model"),
        (409, "damaged or incompatible prompt, one not ready (being refined, failed, cancelled), or a cancel of one "
              "not being refined"),
        (411, "body without Content-Length"), (413, "request or context too large"), (422, "invalid request"),
        (429, "too many open streams or refinement jobs"), (501, "no PGM on this server"),
    )
}
ERROR_RESPONSES[429]["headers"] = {
    "Retry-After": {"description": "refinement jobs: seconds until one is expected to end", "schema": {"type": "integer"}}
}

# OpenAPI links: what a client (or a stateful fuzzer) can do next with a stored prompt.
PROMPT_LINKS = {
    "ReadThePrompt": {"operationId": "get_prompt", "parameters": {"prompt_id": "$response.body#/prompt_id"}},
    "CompleteWithThePrompt": {"operationId": "create_completion", "requestBody": {"model": "$response.body#/model"}},
    "DeleteThePrompt": {"operationId": "delete_prompt", "parameters": {"prompt_id": "$response.body#/prompt_id"}},
}
# ... and with a refinement job: poll its status, cancel it, or use the unrefined prompt meanwhile.
JOB_LINKS = {
    "PollTheStatus": PROMPT_LINKS["ReadThePrompt"],
    "CancelTheRefinement": {"operationId": "cancel_refinement", "parameters": {"prompt_id": "$response.body#/prompt_id"}},
    "CompleteWithTheUnrefinedPrompt": {
        "operationId": "create_completion", "requestBody": {"model": "$response.body#/unrefined_model"}
    },
    "DeleteThePrompt": PROMPT_LINKS["DeleteThePrompt"],
}
STATUS_CODES = {CACHED: 200, ACCEPTED: 202}  # else 201: made now


def error_response(status: int, message: str, type_: Optional[str] = None, code: Optional[str] = None,
                   param: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    """OpenAI's error envelope."""
    detail = {"message": message, "type": type_ or STATUS_TYPES.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse(status_code=status, content={"error": detail}, headers=headers)


def _domain_error(error: Exception) -> Optional[JSONResponse]:
    for cls, status, type_, code in ERROR_STATUS:
        if isinstance(error, cls):
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            retry_after = getattr(error, "retry_after", None)
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
            return error_response(status, message, type_, code, getattr(error, "param", None), headers)
    return None


def _validation_message(error: RequestValidationError) -> tuple[str, Optional[str]]:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        problems.append(f"{location or 'body'}: {item.get('msg')}")
    first = error.errors()[0].get("loc", ()) if error.errors() else ()
    param = next((str(part) for part in first if part not in ("body", "query", "path")), None)
    return "; ".join(problems) or "Invalid request body.", param


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route serves at the request's path (asked of each route, included routers too)."""
    methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    routes = app.router.routes
    return [m for m in methods if any(route.matches({**scope, "method": m})[0] is Match.FULL for route in routes)]


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

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        title="peft-metal", description="MetaL-Prompt serving: stored prompts, OpenAI-compatible completions.",
        lifespan=lifespan, responses=ERROR_RESPONSES,
    )
    app.state.service = service

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        """413 for a body over the limit, told by its Content-Length before anything is read; a body sent without
        one (chunked) gets 411, since its size could only be learned by reading it."""
        declared = request.headers.get("content-length")
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

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            service.metrics.request(getattr(route, "path", "unmatched"), request.method, status, time.perf_counter() - start)

    @app.exception_handler(ServiceError)
    @app.exception_handler(PromptNotFoundError)
    @app.exception_handler(DamagedPromptError)
    @app.exception_handler(ContextTooLongError)
    async def domain_error(request: Request, error: Exception) -> JSONResponse:
        return _domain_error(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type")
        about_body = any(tuple(item.get("loc", ()))[:1] == ("body",) for item in error.errors())
        if about_body and content_type is not None and not _is_json(content_type):  # `curl -d` without a header
            message = (f"The body must be JSON, sent with `Content-Type: application/json`; this request's is "
                       f"{content_type!r} (with curl, add -H 'Content-Type: application/json').")
            return error_response(422, message, code="invalid_request")
        message, param = _validation_message(error)
        return error_response(422, message, code="invalid_request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = getattr(error, "headers", None)
        if error.status_code == 405:  # Starlette names only the first route's methods; a path has one per method
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(app, request.scope))}
        return error_response(error.status_code, str(error.detail), headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("Unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"Internal server error: {type(error).__name__}.", "server_error")

    # Declared as an HTTP bearer scheme, so the OpenAPI document (and /docs) says how to authenticate.
    bearer = HTTPBearer(auto_error=False, description="the server's API key: Authorization: Bearer <key>")

    def authorize(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        token = credentials.credentials.strip().encode() if credentials is not None else b""
        if not secrets.compare_digest(token, api_key.encode()):
            raise StarletteHTTPException(
                401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", headers={"WWW-Authenticate": "Bearer"}
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)] if api_key is not None else [])

    @v1.post("/prompts", status_code=201, operation_id="create_prompt",
             responses={200: {"model": PromptCreated, "description": "the same prompt, stored before"},
                        201: {"model": PromptCreated, "description": "a new prompt, stored", "links": PROMPT_LINKS},
                        202: {"model": PromptStatus, "description": "refine_steps > 0: the prompt is being refined "
                              "(a job); poll its status", "links": JOB_LINKS}})
    async def create_prompt(
        body: CreatePromptRequest,
        wait: Optional[float] = Query(
            None, gt=0, le=MAX_WAIT_S, description="with refine_steps: wait up to this many seconds for the "
            "refinement to finish (201 if it did, else 202)",
        ),
    ) -> JSONResponse:
        made, outcome = await service.create_prompt(
            body.task, as_shots(body.shots), body.num_demonstrations, body.refine_steps, wait
        )
        return JSONResponse(made.model_dump(exclude_none=True), status_code=STATUS_CODES.get(outcome, 201))

    @v1.get("/prompts/{prompt_id}", operation_id="get_prompt",
            responses={200: {"model": PromptStatus, "description": "ready (with the store's row), refining, failed "
                             "or cancelled"}})
    async def get_prompt(prompt_id: str) -> JSONResponse:
        status = await service.prompt_status(prompt_id)
        return JSONResponse(jsonable_encoder(status, exclude_none=True))

    @v1.post("/prompts/{prompt_id}/cancel", response_model=PromptStatus, response_model_exclude_none=True,
             operation_id="cancel_refinement")
    async def cancel_refinement(prompt_id: str) -> PromptStatus:
        return await service.cancel_refinement(prompt_id)

    @v1.delete("/prompts/{prompt_id}", status_code=204, operation_id="delete_prompt")
    async def delete_prompt(prompt_id: str) -> Response:
        await service.delete_prompt(prompt_id)
        return Response(status_code=204)

    @v1.post(
        "/completions", response_model=CompletionResponse, operation_id="create_completion",
        responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: server-sent events"}},
    )
    async def completions(body: CompletionRequest) -> Any:
        if not body.stream:
            return await service.complete(body)
        chunks, release = await service.open_stream(body)
        return StreamingResponse(_events(chunks), media_type="text/event-stream", background=BackgroundTask(release))

    @v1.get("/models", response_model=ModelList, operation_id="list_models")
    async def models() -> ModelList:
        return await service.models()

    app.include_router(v1)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return service.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: one `data:` line per chunk, then `data: [DONE]`."""
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
