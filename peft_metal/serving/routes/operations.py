"""What an operator (or a load balancer) asks, without the API key: `GET /healthz`, `GET /metrics` (Prometheus
text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from .dependencies import ServiceDep

router = APIRouter()


@router.get("/healthz")
async def healthz(service: ServiceDep) -> dict[str, Any]:
    return service.health()


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(service: ServiceDep) -> PlainTextResponse:
    return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
