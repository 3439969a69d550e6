"""The HTTP service: prompts are generated once by the PGM, stored, and read by the frozen LM for every completion.

    app = create_app(model, tokenizer, PromptStore("prompts/"), api_key=None, batch_window_ms=5, max_batch=16)

Routes (JSON; `/v1/*` need `Authorization: Bearer KEY` when an api key is set):

* `POST /v1/prompts` `{"task", "shots": [{"input", "output"}], "num_demonstrations": 0}`: 201 with the new prompt's
  id, design and size (and `text` for discrete prompts), or 200 with `cached: true` when the same task, shots and
  split were stored before (the PGM runs once per distinct request, also under concurrency).
* `GET /v1/prompts/{id}`: the store's row for it; `DELETE /v1/prompts/{id}`: 204, or 404.
* `POST /v1/completions` `{"prompt_id", "input": str | [str], "max_new_tokens", "temperature", "options"?, "shots"?}`:
  each input is formatted with the shot template and read after the prompt (and its demonstrations); the answer is
  generated (greedy at temperature 0, cut at the template's stop strings) or, with `options`, chosen by the
  length-normalized log-likelihood of each option, as evaluation scores them. `prompt_id: null` reads the plain LM:
  zero-shot, or in-context learning with `shots` sent along (formatted as demonstrations before every input).
* `GET /v1/models`: the OpenAI-style model list: the base model, and each stored prompt as `metal:<prompt_id>`.
* `GET /healthz`, `GET /metrics` (Prometheus text).

Errors: 422 malformed bodies or shots, 404 unknown prompt, 413 input too long for the model's context, 401 wrong or
missing api key, 409 a stored prompt that is damaged or made for another base model (never served), 500 bugs only.

Limits (each a `Service` setting and a `peft-metal serve` flag): a request body of at most 1 MiB (413; a body sent
without Content-Length gets 411), at most 512 shots per prompt (422), 64 inputs per completion request (422) and
32,768 query tokens per completion request (413).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Callable, Optional, Union

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, PlainTextResponse

from ..evaluation.methods import ModelParts
from ..evaluation.metrics import best_option, cut_generation, has_stop
from ..evaluation.scoring import empty_context, prompt_context
from ..metal_prompt.chunking import chunk_shots
from ..metal_prompt.fingerprint import check_same_base
from ..metal_prompt.model import json_ready
from ..metal_prompt.prompt import GeneratedPrompt
from ..metal_prompt.reading import eos_token_ids, max_context_length, model_device
from ..metal_prompt.template import ShotTemplate, normalize_shots
from .batching import GENERATE, OPTIONS, Batcher, ContextCache, Job, ModelRunner, PromptEntry
from .engine import generate_batch, score_options_batch
from .metrics import ServerMetrics
from .schemas import (
    MAX_INPUTS_PER_REQUEST,
    Choice,
    CompletionRequest,
    CompletionResponse,
    CreatePromptRequest,
    OptionScore,
    PromptCreated,
)
from .store import DamagedPromptError, PromptNotFoundError, PromptStore, prompt_key

logger = logging.getLogger(__name__)

DEFAULT_BATCH_WINDOW_MS = 5.0
DEFAULT_MAX_BATCH = 16
DEFAULT_CONTEXT_CACHE_SIZE = 64
# Limits on what one request may ask of the server (each refused with 413 or 422 and a message naming the limit).
DEFAULT_MAX_BODY_BYTES = 1 << 20  # a request body: 1 MiB
DEFAULT_MAX_SHOTS = 512  # shots in one prompt request
DEFAULT_MAX_REQUEST_TOKENS = 32768  # query tokens of all inputs of one completion request


def _error(status: int, message: str, **headers: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message, headers=headers or None)


def pgm_weights_digest(tuner: Any) -> str:
    """sha256 of the PGM's own weights (LoRA and padding), so prompts of a retrained PGM get other ids."""
    digest = hashlib.sha256()
    for name, parameter in sorted(tuner.pgm_named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


METAL_MODEL_PREFIX = "metal:"  # a stored prompt, named as a model of the OpenAI-style API


def _unix_time(timestamp: str, default: int) -> int:
    """An ISO-8601 time from the store as Unix seconds (the default for one that does not parse)."""
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(timestamp).timestamp())
    except (TypeError, ValueError):
        return default


def _template_of(prompt: GeneratedPrompt, default: ShotTemplate) -> ShotTemplate:
    """The template the prompt's PGM was configured with (queries must look like its shots), else the server's."""
    config = prompt.pgm_config or {}
    try:
        return ShotTemplate(config["input_prefix"], config["output_prefix"], config["shot_separator"])
    except (KeyError, TypeError):
        return default


class Service:
    """Everything the routes share: the model parts, the store, the batcher, the context cache and the metrics."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        store: Union[PromptStore, str, os.PathLike],
        api_key: Optional[str] = None,
        batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
        max_batch: int = DEFAULT_MAX_BATCH,
        context_cache_size: int = DEFAULT_CONTEXT_CACHE_SIZE,
        model_name: Optional[str] = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_shots: int = DEFAULT_MAX_SHOTS,
        max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
    ) -> None:
        model.eval()
        self.parts = ModelParts.from_model(model)
        self.lm, self.template, self.tuner = self.parts.lm, self.parts.template, self.parts.tuner
        self.tokenizer = tokenizer
        self.store = store if isinstance(store, PromptStore) else PromptStore(store)
        self.api_key = api_key or None
        for name, value in (("max_body_bytes", max_body_bytes), ("max_shots", max_shots), ("max_request_tokens", max_request_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        self.max_body_bytes, self.max_shots, self.max_request_tokens = max_body_bytes, max_shots, max_request_tokens
        self.model_name = model_name or getattr(self.lm.config, "name_or_path", None) or type(self.lm).__name__
        self.limit = max_context_length(self.lm)
        self.started_at = time.time()
        self.metrics = ServerMetrics()
        self.runner = ModelRunner()
        # Store calls block (file I/O, SQLite locks) and may wait on the model thread (`make`): never on the loop, and
        # never in the model thread (which must never wait on them).
        self.store_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="peft-metal-store")
        self.batcher = Batcher(self.runner, self._run_batch, batch_window_ms / 1000.0, max_batch, self.metrics)
        self.contexts = ContextCache(context_cache_size, self.metrics)
        self.tokenizer_lock = threading.Lock()  # the tokenizer is shared by the loop and the model thread
        self.pad_id = self._pad_id()
        self.eos_ids = eos_token_ids(self.lm, self.tokenizer)
        self.plain = PromptEntry(key=None, context=empty_context(), template=self.template)
        self._creating: dict[str, asyncio.Future] = {}
        if self.tuner is not None:
            self.base_fingerprint = self.tuner.base_fingerprint()
            self.pgm_config = {**json_ready(self.tuner.metal_config.to_dict()), "pgm_weights": pgm_weights_digest(self.tuner)}
        else:
            self.base_fingerprint, self.pgm_config = None, None

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.lm.generation_config.pad_token_id, self.tokenizer.eos_token_id):
            if isinstance(candidate, int):
                return candidate
        return 0

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, tokens: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    async def in_store(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.store_executor, function, *args)

    # -------------------------------------------------------------------------------------------------- prompts

    async def create_prompt(self, body: CreatePromptRequest) -> tuple[PromptCreated, bool]:
        if self.tuner is None:
            raise _error(501, "This server runs a plain LM without a PGM: it cannot generate prompts.")
        if isinstance(body.shots, list) and len(body.shots) > self.max_shots:
            raise _error(422, f"At most {self.max_shots} shots per prompt, got {len(body.shots)}.")
        try:
            shots = normalize_shots(body.shots)
        except (ValueError, TypeError) as error:
            raise _error(422, str(error)) from None
        if not body.num_demonstrations < len(shots):
            raise _error(
                422,
                f"num_demonstrations={body.num_demonstrations} must be below the number of shots ({len(shots)}): "
                "at least one shot has to be left for the PGM to read.",
            )
        self._check_pgm_fits(shots, body.num_demonstrations)
        key = prompt_key(body.task, shots, body.num_demonstrations, self.base_fingerprint, self.pgm_config)
        loop = asyncio.get_running_loop()
        pending = self._creating.get(key)
        if pending is not None and pending.get_loop() is loop:  # the same prompt is being made: wait for it
            prompt_id, prompt, _ = await asyncio.shield(pending)
            cached = True
        else:
            # A task of its own: a client going away does not cancel a generation others may be waiting for.
            task = self._creating[key] = loop.create_task(self._get_or_create(body.task, shots, body.num_demonstrations))
            task.add_done_callback(lambda done: self._creating.pop(key) if self._creating.get(key) is done else None)
            prompt_id, prompt, cached = await asyncio.shield(task)
        self.metrics.inc(self.metrics.store, "hit" if cached else "miss")
        created = PromptCreated(
            prompt_id=prompt_id,
            design=prompt.design,
            num_tokens=prompt.num_tokens,
            num_demonstrations=body.num_demonstrations,
            cached=cached,
            text=prompt.text if prompt.design == "discrete" else None,
        )
        return created, cached

    async def _get_or_create(self, task: str, shots: list[tuple[str, str]], num_demonstrations: int):
        def make() -> GeneratedPrompt:  # called in a store thread, runs the PGM in the model thread
            def generate() -> GeneratedPrompt:
                with self.tokenizer_lock:  # generate_prompt tokenizes; the loop thread may be tokenizing too
                    return self.tuner.generate_prompt(
                        shots, tokenizer=self.tokenizer, num_demonstrations=num_demonstrations, chunk_size="auto"
                    )

            return self.runner.call(generate)

        try:
            return await self.in_store(
                self.store.get_or_create, task, shots, num_demonstrations, self.base_fingerprint, self.pgm_config, make
            )
        except DamagedPromptError as error:
            raise _error(409, str(error)) from None
        except (ValueError, TypeError) as error:  # the library refusing these shots
            raise _error(422, str(error)) from None

    def _check_pgm_fits(self, shots: list[tuple[str, str]], num_demonstrations: int) -> None:
        """413 only for shots that cannot be read even chunk by chunk; more shots than fit at once are folded in."""
        split = len(shots) - num_demonstrations
        try:
            with self.tokenizer_lock:
                chunk_shots(
                    shots[:split], self.tokenizer, self.template, self.tuner.metal_config.num_prompt_tokens, self.limit, "auto"
                )
        except ValueError as error:
            raise _error(413, str(error)) from None

    async def prompt_info(self, prompt_id: str) -> dict[str, Any]:
        """The index row; for a discrete prompt also its `token_ids` and `text` (plain text any LM service can use)
        and the demonstrations' text, read from its file (a read, not a use: no hit is counted)."""
        try:
            info = await self.in_store(self.store.info, prompt_id)
            if info["design"] == "discrete":
                prompt = await self.in_store(self.store.get, prompt_id, "cpu", False)
                info.update(token_ids=prompt.token_ids.tolist(), text=prompt.text, demonstrations_text=prompt.demonstrations_text)
        except PromptNotFoundError as error:
            raise _error(404, str(error)) from None
        except DamagedPromptError as error:
            raise _error(409, str(error)) from None
        return jsonable_encoder(info)

    async def delete_prompt(self, prompt_id: str) -> bool:
        self.contexts.evict(prompt_id)
        try:
            deleted = await self.in_store(self.store.delete, prompt_id)
        except PromptNotFoundError:
            deleted = False
        self.contexts.evict(prompt_id)  # again: a load that finished meanwhile must not stay cached
        return deleted

    async def entry(self, prompt_id: str) -> PromptEntry:
        return await self.contexts.get(prompt_id, self._load_entry)

    async def _load_entry(self, prompt_id: str) -> PromptEntry:
        try:
            prompt = await self.in_store(self.store.get, prompt_id)
        except PromptNotFoundError as error:
            raise _error(404, str(error)) from None
        except DamagedPromptError as error:
            raise _error(409, str(error)) from None
        try:
            check_same_base(prompt.base_fingerprint, self.base_fingerprint or self._fingerprint())
        except ValueError as error:
            raise _error(409, f"Stored prompt {prompt_id} cannot be served by this model: {error}") from None

        def read() -> PromptEntry:
            with self.parts.lora_off():
                device = model_device(self.lm)
                context = prompt_context(self.lm, prompt.to(device))
            return PromptEntry(key=prompt_id, context=context, design=prompt.design, template=_template_of(prompt, self.template))

        return await self.runner.run(read)

    def _fingerprint(self) -> dict[str, Any]:
        from ..metal_prompt.fingerprint import base_model_fingerprint

        if getattr(self, "_plain_fingerprint", None) is None:
            self._plain_fingerprint = base_model_fingerprint(self.lm)
        return self._plain_fingerprint

    # ---------------------------------------------------------------------------------------------- completions

    async def complete(self, body: CompletionRequest) -> CompletionResponse:
        inputs = [body.input] if isinstance(body.input, str) else list(body.input)
        if not inputs:
            raise _error(422, "input is an empty list: send one input or a list of them.")
        if len(inputs) > MAX_INPUTS_PER_REQUEST:
            raise _error(422, f"At most {MAX_INPUTS_PER_REQUEST} inputs per request, got {len(inputs)}.")
        if body.shots is not None and body.prompt_id is not None:
            raise _error(422, "shots (in-context demonstrations) go with prompt_id null only; a stored prompt has its own.")
        entry = self.plain if body.prompt_id is None else await self.entry(body.prompt_id)
        template = entry.template or self.template
        prefix: list[int] = []
        if body.shots is not None:
            try:
                prefix = self.encode(template.format_shots(normalize_shots(body.shots)))
            except (ValueError, TypeError) as error:
                raise _error(422, str(error)) from None
        queries = [prefix + self.encode(template.format_query(text)) for text in inputs]
        total = sum(len(query) for query in queries)
        if total > self.max_request_tokens:
            raise _error(
                413,
                f"The inputs of this request take {total} tokens (with their template and demonstrations); this server "
                f"reads at most {self.max_request_tokens} per request. Split the inputs over several requests.",
            )
        options = None
        if body.options is not None:
            if any(not option.strip() for option in body.options):
                raise _error(422, "options holds a blank option; every option needs some text.")
            if len(set(body.options)) != len(body.options):
                raise _error(422, f"options has duplicates: {body.options!r}.")
            options = [self.encode(template.format_answer(option)) for option in body.options]
            if any(not ids for ids in options):
                raise _error(422, "An option encodes to no tokens; every option must have at least one token.")
        after = max(len(ids) for ids in options) if options is not None else body.max_new_tokens
        self._check_fits(entry, max(len(q) for q in queries), after, "longest option" if options else "max_new_tokens")
        jobs = []
        for index, query in enumerate(queries):
            generator = None
            if body.temperature > 0 and body.seed is not None:
                generator = torch.Generator().manual_seed(body.seed + index)
            jobs.append(
                Job(
                    kind=OPTIONS if options is not None else GENERATE,
                    query=query,
                    max_new_tokens=body.max_new_tokens,
                    temperature=body.temperature,
                    generator=generator,
                    options=options,
                )
            )
        results = await self.batcher.submit(entry, jobs)
        choices = []
        for index, (text, result) in enumerate(zip(inputs, results)):
            if options is not None:
                scores = [
                    OptionScore(option=option, mean_logprob=s.mean_logprob, sum_logprob=s.sum_logprob, num_tokens=s.num_tokens)
                    for option, s in zip(body.options, result)
                ]
                best = best_option([s.mean_logprob for s in result])
                choices.append(Choice(index=index, input=text, option=body.options[best], scores=scores))
            else:
                answer = cut_generation(self.decode(result.tokens), template)
                choices.append(
                    Choice(index=index, input=text, text=answer, finish_reason=result.finish_reason, num_tokens=len(result.tokens))
                )
        return CompletionResponse(
            prompt_id=body.prompt_id, mode=OPTIONS if options is not None else GENERATE, choices=choices
        )

    def _check_fits(self, entry: PromptEntry, query_length: int, after: int, what: str) -> None:
        if self.limit is None:
            return
        total = entry.context.length + query_length + after
        if total > self.limit:
            raise _error(
                413,
                f"Prompt and demonstrations ({entry.context.length} tokens) + longest input ({query_length}) + {what} "
                f"({after}) = {total} tokens, {total - self.limit} over the model's context of {self.limit}. "
                "Send shorter inputs or ask for fewer new tokens.",
            )

    def _run_batch(self, entry: PromptEntry, jobs: list[Job]) -> list[Any]:
        """In the model thread: one batched LM call for jobs of one kind after the same context."""
        queries = [job.query for job in jobs]
        with self.parts.lora_off():
            if jobs[0].kind == OPTIONS:
                return score_options_batch(self.lm, entry.context, queries, [job.options for job in jobs], self.pad_id)
            template = entry.template or self.template
            return generate_batch(
                self.lm,
                entry.context,
                queries,
                [job.max_new_tokens for job in jobs],
                [job.temperature for job in jobs],
                [job.generator for job in jobs],
                eos_token_ids=self.eos_ids,
                stop=lambda tokens: has_stop(self.decode(tokens), template),
                pad_id=self.pad_id,
            )

    async def models(self) -> dict[str, Any]:
        """The OpenAI model list: the base model, and every stored prompt as `metal:<prompt_id>` (the base model
        reading that prompt before the text)."""
        created = int(self.started_at)
        data = [{"id": self.model_name, "object": "model", "created": created, "owned_by": "peft-metal"}]
        for row in await self.in_store(self.store.list):
            stamp = _unix_time(row["created_at"], created)
            data.append({"id": f"{METAL_MODEL_PREFIX}{row['prompt_id']}", "object": "model", "created": stamp,
                         "owned_by": "peft-metal", "root": self.model_name, "parent": self.model_name})
        return {"object": "list", "data": data}

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_name,
            "design": self.tuner.metal_config.prompt_design if self.tuner is not None else None,
            "max_context": self.limit,
            "batch_window_ms": self.batcher.window_s * 1000.0,
            "max_batch": self.batcher.max_batch,
            "cached_contexts": len(self.contexts),
        }

    def close(self) -> None:
        self.batcher.cancel()


def create_app(model: Any, tokenizer: Any, store: Union[PromptStore, str, os.PathLike], **settings: Any) -> FastAPI:
    """The FastAPI app serving `model` (a MetaL-Prompt PeftModel; a plain LM serves `prompt_id: null` only).
    `settings` are `Service`'s keyword arguments: api_key, batch_window_ms, max_batch, context_cache_size, model_name."""
    service = Service(model, tokenizer, store, **settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="peft-metal", description="MetaL-Prompt serving: stored prompts, batched reads.", lifespan=lifespan)
    app.state.service = service

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        """413 for a body over the limit, told by its Content-Length before anything is read; a body sent without
        one (chunked) gets 411, since its size could only be learned by reading it."""
        limit = service.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is None and request.method in ("POST", "PUT", "PATCH"):
            return JSONResponse(status_code=411, content={"detail": "Send the request body with a Content-Length."})
        if declared is not None and not declared.isdigit():
            return JSONResponse(status_code=400, content={"detail": f"Content-Length {declared!r} is not a byte count."})
        if declared is not None and int(declared) > limit:
            return JSONResponse(
                status_code=413,
                content={"detail": f"Request body of {declared} bytes; this server takes at most {limit} per request."},
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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("Unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": f"Internal server error: {type(error).__name__}."})

    def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), service.api_key.encode()):
            raise _error(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", **{"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.post("/prompts", response_model=PromptCreated, response_model_exclude_none=True, status_code=201)
    async def create_prompt(body: CreatePromptRequest, response: Response) -> PromptCreated:
        created, cached = await service.create_prompt(body)
        response.status_code = 200 if cached else 201
        return created

    @v1.get("/prompts/{prompt_id}")
    async def get_prompt(prompt_id: str) -> dict[str, Any]:
        return await service.prompt_info(prompt_id)

    @v1.delete("/prompts/{prompt_id}", status_code=204)
    async def delete_prompt(prompt_id: str) -> Response:
        if not await service.delete_prompt(prompt_id):
            raise _error(404, f"No prompt with id {prompt_id!r} in this store.")
        return Response(status_code=204)

    @v1.post("/completions", response_model=CompletionResponse, response_model_exclude_none=True)
    async def completions(body: CompletionRequest) -> CompletionResponse:
        return await service.complete(body)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return await service.models()

    app.include_router(v1)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return service.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
