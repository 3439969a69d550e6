"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

MAX_INPUTS_PER_REQUEST = 64
MAX_OPTIONS = 64
MAX_NEW_TOKENS = 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreatePromptRequest(_Body):
    task: StrictStr = Field(min_length=1, max_length=200, description="a name for the task (stored with the prompt)")
    # Shots are checked by the library's `normalize_shots` ([{"input", "output"}] or [[input, output]]), so
    # malformed ones get its messages (422).
    shots: Any = Field(description='[{"input": str, "output": str}, ...]')
    num_demonstrations: StrictInt = Field(0, ge=0, description="the last d shots are kept as plain demonstrations")


class PromptCreated(BaseModel):
    prompt_id: str
    design: str
    num_tokens: int
    num_demonstrations: int
    cached: bool
    text: Optional[str] = None  # discrete prompts only


class CompletionRequest(_Body):
    prompt_id: Optional[StrictStr] = Field(
        None, description="a stored prompt; null reads the plain LM (zero-shot, or ICL with `shots`)"
    )
    input: Union[StrictStr, list[StrictStr]] = Field(description="one input or a list of inputs (formatted as queries)")
    max_new_tokens: StrictInt = Field(16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0: greedy; otherwise sampling")
    seed: Optional[StrictInt] = Field(None, description="seeds sampling (temperature > 0), per input")
    options: Optional[list[StrictStr]] = Field(
        None, min_length=1, max_length=MAX_OPTIONS, description="score these answers instead of generating"
    )
    shots: Optional[Any] = Field(
        None, description="with prompt_id null only: shots formatted as in-context demonstrations before each input"
    )


class OptionScore(BaseModel):
    option: str
    mean_logprob: float
    sum_logprob: float
    num_tokens: int


class Choice(BaseModel):
    index: int
    input: str
    text: Optional[str] = None  # generation
    finish_reason: Optional[str] = None
    num_tokens: Optional[int] = None
    option: Optional[str] = None  # option scoring: the chosen option (highest length-normalized log-likelihood)
    scores: Optional[list[OptionScore]] = None


class CompletionResponse(BaseModel):
    prompt_id: Optional[str]
    mode: str  # "generate" or "options"
    choices: list[Choice]
