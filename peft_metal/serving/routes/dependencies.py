"""What the routes depend on, read from the app they serve (`app.state`, set by `create_app`): the service, and the
API key check that guards `/v1/*` when the app has a key."""

from __future__ import annotations

import secrets
from typing import Annotated, Optional

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..service import Service


async def service_of(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service_of)]

# Declared as an HTTP bearer scheme, so the OpenAPI document (and /docs) says how to authenticate.
bearer = HTTPBearer(auto_error=False, description="the server's API key: Authorization: Bearer <key>")


def authorize(request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
    """401 unless the request's bearer token is the app's API key (compared in constant time)."""
    token = credentials.credentials.strip().encode() if credentials is not None else b""
    if not secrets.compare_digest(token, request.app.state.api_key.encode()):
        raise StarletteHTTPException(
            401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", headers={"WWW-Authenticate": "Bearer"}
        )
