"""`/v1/prompts`: create a prompt (200 stored before, 201 made now, 202 being refined, `?wait=`), read its status,
cancel its refinement, delete it."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Query, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from ..schemas import MAX_WAIT_S, CreatePromptRequest, PromptCreated, PromptStatus, as_shots
from ..service import ACCEPTED, CACHED
from .dependencies import ServiceDep

router = APIRouter(prefix="/v1")

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


@router.post("/prompts", status_code=201, operation_id="create_prompt",
             responses={200: {"model": PromptCreated, "description": "the same prompt, stored before"},
                        201: {"model": PromptCreated, "description": "a new prompt, stored", "links": PROMPT_LINKS},
                        202: {"model": PromptStatus, "description": "refine_steps > 0: the prompt is being refined "
                              "(a job); poll its status", "links": JOB_LINKS}})
async def create_prompt(
    body: CreatePromptRequest,
    service: ServiceDep,
    wait: Optional[float] = Query(
        None, gt=0, le=MAX_WAIT_S, description="with refine_steps: wait up to this many seconds for the "
        "refinement to finish (201 if it did, else 202)",
    ),
) -> JSONResponse:
    made, outcome = await service.create_prompt(
        body.task, as_shots(body.shots), body.num_demonstrations, body.refine_steps, wait, body.calibrate
    )
    return JSONResponse(made.model_dump(exclude_none=True), status_code=STATUS_CODES.get(outcome, 201))


@router.get("/prompts/{prompt_id}", operation_id="get_prompt",
            responses={200: {"model": PromptStatus, "description": "ready (with the store's row), refining, failed "
                             "or cancelled"}})
async def get_prompt(prompt_id: str, service: ServiceDep) -> JSONResponse:
    status = await service.prompt_status(prompt_id)
    return JSONResponse(jsonable_encoder(status, exclude_none=True))


@router.post("/prompts/{prompt_id}/cancel", response_model=PromptStatus, response_model_exclude_none=True,
             operation_id="cancel_refinement")
async def cancel_refinement(prompt_id: str, service: ServiceDep) -> PromptStatus:
    return await service.cancel_refinement(prompt_id)


@router.delete("/prompts/{prompt_id}", status_code=204, operation_id="delete_prompt")
async def delete_prompt(prompt_id: str, service: ServiceDep) -> Response:
    await service.delete_prompt(prompt_id)
    return Response(status_code=204)
