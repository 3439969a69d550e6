"""`GET /v1/models`: the base model, and each stored prompt as `metal:<prompt_id>`."""

from __future__ import annotations

from fastapi import APIRouter

from ..schemas import ModelList
from .dependencies import ServiceDep

router = APIRouter(prefix="/v1")


@router.get("/models", response_model=ModelList, operation_id="list_models")
async def models(service: ServiceDep) -> ModelList:
    return await service.models()
