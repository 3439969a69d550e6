"""Request and response bodies of the HTTP API: the prompt routes, and OpenAI's completions with peft-metal's
extensions (`options`, `template`, `shots`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from ..metal_prompt.template import Shots

MAX_INPUTS_PER_REQUEST = 64
MAX_OPTIONS = 64
MAX_NEW_TOKENS = 1024
MAX_CHOICES_PER_PROMPT = 16
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4
MAX_REFINE_STEPS = 100
MAX_WAIT_S = 600.0  # how long POST /v1/prompts?wait= may hold a request for a refinement to finish

# The schema states every rule about one field, so clients (and schema-driven fuzzers) learn them from
# /openapi.json; rules that tie fields together (best_of equal to n, options without stream, a context that fits the
# model) are the service's and answer 422 or 413.

NonBlank = Annotated[StrictStr, Field(pattern=r"\S")]
NonEmpty = Annotated[StrictStr, Field(min_length=1)]


def _whole_numbers(value: Any) -> Any:
    """3.0 as 3, all through a JSON value: JSON has one number type and JSON Schema counts 3.0 as an integer, which
    pydantic's strict ints would refuse. Floats stay floats where a float is wanted (an int validates as one)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(_Body):
    """A whole request body: unknown fields refused, numbers as JSON Schema defines them (an integer is 3 or 3.0, a
    number 3 or 3.5; never true or "3"). Converted once here, for the nested parts too."""

    @model_validator(mode="before")
    @classmethod
    def _integers_as_json_schema_has_them(cls, data: Any) -> Any:
        return _whole_numbers(data)


class Shot(_Body):
    input: StrictStr
    output: StrictStr


ShotList = list[Union[Shot, tuple[StrictStr, StrictStr]]]


def as_shots(shots: ShotList) -> Shots:
    """A request's shots (objects or pairs, already checked by the schema) as the library's checked `Shots`."""
    return Shots((shot.input, shot.output) if isinstance(shot, Shot) else tuple(shot) for shot in shots)


class CreatePromptRequest(_Request):
    task: StrictStr = Field(min_length=1, max_length=200, description="a name for the task (stored with the prompt)")
    shots: ShotList = Field(
        min_length=1, description='[{"input": str, "output": str}, ...] or [[input, output], ...]; at most the '
        "server's --max-shots (default 512)"
    )
    num_demonstrations: StrictInt = Field(
        0, ge=0, description="the last d shots are kept as plain demonstrations (fewer than the shots)"
    )
    refine_steps: StrictInt = Field(
        0, ge=0, le=MAX_REFINE_STEPS, description="then tune the prompt by this many gradient steps on the shots the "
        "PGM read (0: the one PGM pass); done once, as a job: 202 with the prompt's status to poll (GET "
        "/v1/prompts/{prompt_id}) unless the request waits (?wait=seconds)"
    )
    calibrate: StrictBool = Field(
        False, description="also record the prior the prompt gives the shots' outputs as labels (each shot's input "
        "read after it, every label scored): completions with options and calibrate divide it out"
    )


class PromptCreated(BaseModel):
    prompt_id: str
    model: str = Field(description="the name to complete with: metal:<prompt_id>")
    design: str
    num_tokens: int
    num_demonstrations: int
    refine_steps: int = 0
    cached: bool
    text: Optional[str] = None  # prompts made of vocabulary tokens (the discrete design) only
    option_prior: Optional[dict[str, float]] = Field(
        None, description="with calibrate: the probability the prompt gives each label, on average over the shots"
    )


class PromptStatus(BaseModel):
    """Where a prompt is: `refining` (a job; `unrefined_model` is the PGM's prompt before refinement, usable
    meanwhile), `ready` (stored: complete with `model`), `failed` or `cancelled` (with the `reason`; nothing stored).
    A ready prompt's status also carries its store row."""

    model_config = ConfigDict(extra="allow")

    prompt_id: str
    model: str = Field(description="the name to complete with once ready: metal:<prompt_id>")
    status: Literal["refining", "ready", "failed", "cancelled"]
    task: Optional[str] = None
    refine_steps: Optional[int] = None
    steps_done: Optional[int] = Field(None, description="refinement steps taken so far (refining)")
    unrefined_model: Optional[str] = Field(None, description="the same prompt unrefined, metal:<id>, to use meanwhile")
    reason: Optional[str] = Field(None, description="why it failed or was cancelled, and what to do")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class CompletionRequest(_Request):
    """OpenAI's `POST /v1/completions` body, plus three extensions. Fields OpenAI has and this server does not
    implement are accepted only at their neutral values, so a client that sends its defaults still works."""

    model: StrictStr = Field(description="the base model's name, or metal:<prompt_id> to read that stored prompt first")
    prompt: Union[
        StrictStr,
        Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_INPUTS_PER_REQUEST)],
        Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)],
        Annotated[
            list[Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_INPUTS_PER_REQUEST),
        ],
    ] = Field(description="a text, a list of texts, token ids (below the vocabulary size), or a list of token id lists")
    max_tokens: Optional[StrictInt] = Field(16, ge=0, le=MAX_NEW_TOKENS, description="new tokens per choice (0 with echo)")
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES_PER_PROMPT, description="choices per prompt")
    stop: Optional[Union[NonEmpty, Annotated[list[NonEmpty], Field(max_length=MAX_STOPS)]]] = Field(
        None, description="up to 4 strings that end a choice"
    )
    seed: Optional[StrictInt] = Field(None, description="makes sampling repeatable (any integer)")
    echo: StrictBool = Field(False, description="return the prompt (and its log-probabilities) before the completion")
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="top log-probabilities per token")
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[StrictStr] = None
    suffix: None = Field(None, description="not supported: must be null")
    best_of: Optional[StrictInt] = Field(
        None, ge=1, le=MAX_CHOICES_PER_PROMPT, description="not supported beyond n: null or equal to n"
    )
    presence_penalty: StrictFloat = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    frequency_penalty: StrictFloat = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    logit_bias: Optional[dict[str, StrictFloat]] = Field(None, max_length=0, description="not supported: must be empty")
    # peft-metal's extensions
    options: Optional[list[NonBlank]] = Field(
        None, min_length=1, max_length=MAX_OPTIONS, json_schema_extra={"uniqueItems": True},
        description="extension: score these continuations after each prompt instead of generating; the choice's "
        "text is the option with the highest per-token mean log-likelihood",
    )
    template: StrictBool = Field(
        False,
        description="extension: format each prompt as a query with the shot template (and each option as its "
        "answer), and cut generations at the template's stops, as meta-training and evaluation read them",
    )
    shots: Optional[ShotList] = Field(
        None, description="extension, base model only: shots formatted as in-context demonstrations before each prompt"
    )
    calibrate: StrictBool = Field(
        False, description="extension, with options, template and a stored prompt made with calibrate: pick the "
        "option whose probability (over the options) divided by the prompt's prior for it is highest"
    )


class OptionScore(BaseModel):
    option: str
    mean_logprob: float
    sum_logprob: float
    num_tokens: int
    calibrated_logprob: Optional[float] = None  # with calibrate: log P(option) over the options minus log prior


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Optional[dict[str, float]]]] = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Optional[Logprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None
    option_scores: Optional[list[OptionScore]] = None  # extension: with `options`


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens the LM read of the request (formatting and shots included)")
    completion_tokens: int
    total_tokens: int
    stored_prompt_tokens: int = Field(
        0, description="extension: the stored prompt and its demonstrations, read once per prompt and cached, "
        "so not counted in prompt_tokens"
    )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: Optional[str] = None
    parent: Optional[str] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
