"""`POST /v1/completions`: OpenAI's completions, as one JSON response or, with `stream`, server-sent events."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from ..schemas import CompletionRequest, CompletionResponse
from .dependencies import ServiceDep

router = APIRouter(prefix="/v1")


@router.post(
    "/completions", response_model=CompletionResponse, operation_id="create_completion",
    responses={200: {"content": {"text/event-stream": {}}, "description": "with stream: server-sent events"}},
)
async def completions(body: CompletionRequest, service: ServiceDep) -> Any:
    if not body.stream:
        return await service.complete(body)
    chunks, release = await service.open_stream(body)
    return StreamingResponse(_events(chunks), media_type="text/event-stream", background=BackgroundTask(release))


async def _events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: one `data:` line per chunk, then `data: [DONE]`."""
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
