"""The one table from domain errors to HTTP status codes, and every error in OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}`: domain errors, invalid requests, HTTP errors (404, 405 with the
path's every method in Allow), and bugs (500). `install_error_handlers(app)` puts them on an app."""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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
from .schemas import ErrorResponse
from .store import DamagedPromptError, PromptNotFoundError

logger = logging.getLogger(__name__)

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
# The base classes the table's rows derive from: one exception handler each.
DOMAIN_ERRORS = (ServiceError, PromptNotFoundError, DamagedPromptError, ContextTooLongError)
STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error"}
# The same errors as the OpenAPI document states them, for every operation.
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


def error_response(status: int, message: str, type_: Optional[str] = None, code: Optional[str] = None,
                   param: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    """OpenAI's error envelope."""
    detail = {"message": message, "type": type_ or STATUS_TYPES.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse(status_code=status, content={"error": detail}, headers=headers)


async def domain_error(request: Request, error: Exception) -> Optional[JSONResponse]:
    """The table's row for `error`: its status, type and code, its `param`, and Retry-After when it has one."""
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


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming every problem (and `param`, the first one's field); a body that is not declared JSON says so."""
    content_type = request.headers.get("content-type")
    about_body = any(tuple(item.get("loc", ()))[:1] == ("body",) for item in error.errors())
    if about_body and content_type is not None and not _is_json(content_type):  # `curl -d` without a header
        message = (f"The body must be JSON, sent with `Content-Type: application/json`; this request's is "
                   f"{content_type!r} (with curl, add -H 'Content-Type: application/json').")
        return error_response(422, message, code="invalid_request")
    message, param = _validation_message(error)
    return error_response(422, message, code="invalid_request", param=param)


def _allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route serves at the request's path (asked of each route, included routers too)."""
    methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    routes = app.router.routes
    return [m for m in methods if any(route.matches({**scope, "method": m})[0] is Match.FULL for route in routes)]


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    headers = getattr(error, "headers", None)
    if error.status_code == 405:  # Starlette names only the first route's methods; a path has one per method
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request.app, request.scope))}
    return error_response(error.status_code, str(error.detail), headers=headers)


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("Unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"Internal server error: {type(error).__name__}.", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    """Every error `app` answers, in OpenAI's envelope."""
    for base in DOMAIN_ERRORS:
        app.add_exception_handler(base, domain_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
