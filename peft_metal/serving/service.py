"""The service's domain: prompts generated once by the PGM and stored; completions read after them, in batches.

Nothing here knows HTTP. A refusal is a domain error (`errors.py`, the store's, or the library's
`ContextTooLongError`); `http_errors.py` maps each to a status code and OpenAI's error envelope.

Completions follow OpenAI's `/v1/completions`: `model` is the base model (the plain LM reads the text) or
`metal:<prompt_id>` (the LM reads that stored prompt and its demonstrations first, from a cached context).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import functools
import hashlib
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union

import torch

from ..inference import (
    EOS,
    STOP,
    Context,
    ContinuationScore,
    Generation,
    ModelParts,
    Sampling,
    TokenLogprob,
    best_option,
    calibrated_scores,
    check_fits,
    cut_generation,
    empty_context,
    eos_token_ids,
    generate,
    has_stop,
    max_context_length,
    model_device,
    option_prior,
    prompt_context,
    score_options,
    score_tokens,
)
from ..metal_prompt.fingerprint import base_model_fingerprint, check_same_base
from ..metal_prompt.model import json_ready
from ..metal_prompt.prompt import GeneratedPrompt
from ..metal_prompt.refine import Refinement
from ..metal_prompt.template import Shots, ShotTemplate, normalize_shots
from .batching import ECHO, GENERATE, OPTIONS, Batcher, ContextCache, Job, ModelRunner, PromptEntry
from .errors import (
    IncompatiblePromptError,
    InvalidRequestError,
    ModelNotFoundError,
    NoPGMError,
    NotRefiningError,
    PromptNotReadyError,
    RequestTooLargeError,
    TooManyJobsError,
    TooManyStreamsError,
)
from .metrics import ServerMetrics
from .schemas import (
    MAX_INPUTS_PER_REQUEST,
    MAX_REFINE_STEPS,
    MAX_STOPS,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Logprobs,
    ModelCard,
    ModelList,
    OptionScore,
    PromptCreated,
    PromptStatus,
    Usage,
    as_shots,
)
from .store import CANCELLED, FAILED, REFINING, DamagedPromptError, PromptNotFoundError, PromptStore, prompt_key

logger = logging.getLogger(__name__)

DEFAULT_BATCH_WINDOW_MS = 5.0
DEFAULT_MAX_BATCH = 16
DEFAULT_CONTEXT_CACHE_SIZE = 64
# Limits on what one request may ask (each refused with a message naming the limit).
DEFAULT_MAX_SHOTS = 512  # shots in one prompt request
DEFAULT_MAX_REQUEST_TOKENS = 32768  # tokens one completion request makes the LM read and generate
DEFAULT_MAX_STREAMS = 16  # streamed completions open at once
DEFAULT_MAX_REFINE_JOBS = 2  # prompts refined at once
CALIBRATION_BATCH = 16  # shots read per model step when a prompt's option prior is read
METAL_MODEL_PREFIX = "metal:"  # a stored prompt, named as a model
# What `create_prompt` did: found the prompt stored, made it now, or started refining it (a job).
CACHED, CREATED, ACCEPTED = "cached", "created", "accepted"


def pgm_weights_digest(tuner: Any) -> str:
    """sha256 of the PGM's own weights (LoRA and padding), so prompts of a retrained PGM get other ids."""
    digest = hashlib.sha256()
    for name, parameter in sorted(tuner.pgm_named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _unix_time(timestamp: str, default: int) -> int:
    """An ISO-8601 time from the store as Unix seconds (the default for one that does not parse)."""
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


@dataclass
class _Completion:
    """A completion request resolved against the model: what is read after which context, and what is asked."""

    entry: PromptEntry
    template: Optional[ShotTemplate]  # set when the request asked for template formatting
    queries: list[list[int]]  # one per prompt
    options: Optional[list[list[int]]]
    stops: list[str]
    n: int
    max_tokens: int
    option_prior: Optional[dict[str, float]] = None  # set when the request asked for calibrated option scoring
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"cmpl-{secrets.token_hex(12)}")


@dataclass
class _RefineJob:
    """A prompt being refined: what it is, how far it is, and the task that runs its steps."""

    prompt_id: str
    task: str
    shots: Shots
    num_demonstrations: int
    refinement: Refinement
    unrefined_id: str
    started: float = field(default_factory=time.perf_counter)
    steps_done: int = 0
    step_seconds: float = 0.0  # model time of the steps so far
    begun: Optional[Awaitable[None]] = field(default=None, repr=False)  # its row written
    runner: Optional[asyncio.Task] = field(default=None, repr=False)

    def status(self) -> PromptStatus:
        return PromptStatus(
            prompt_id=self.prompt_id, model=f"{METAL_MODEL_PREFIX}{self.prompt_id}", status=REFINING, task=self.task,
            refine_steps=self.refinement.steps, steps_done=self.steps_done,
            unrefined_model=f"{METAL_MODEL_PREFIX}{self.unrefined_id}",
        )

    def seconds_left(self) -> float:
        """Steps left times the mean step so far (a second a step before the first is timed)."""
        per_step = self.step_seconds / self.steps_done if self.steps_done else 1.0
        return (self.refinement.steps - self.steps_done) * per_step


def _timed(function: Callable[[], Any]) -> float:
    """The seconds `function()` took (a step's model time, without the completions served after it)."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _status_of_row(row: dict[str, Any]) -> PromptStatus:
    """A job's store row (a job of another process, or one that failed or was cancelled) as its status."""
    return PromptStatus(
        prompt_id=row["prompt_id"], model=f"{METAL_MODEL_PREFIX}{row['prompt_id']}", status=row["status"],
        task=row["task"], refine_steps=row["refine_steps"], reason=row["reason"],
        unrefined_model=f"{METAL_MODEL_PREFIX}{row['unrefined_id']}" if row["unrefined_id"] else None,
    )


def _not_ready(status: PromptStatus) -> PromptNotReadyError:
    if status.status == REFINING:
        progress = f"{status.steps_done} of {status.refine_steps} steps" if status.steps_done is not None else "running"
        return PromptNotReadyError(
            f"Prompt {status.prompt_id} is being refined ({progress}): poll GET /v1/prompts/{status.prompt_id} until "
            f"its status is ready, or complete with {status.unrefined_model} (the same prompt unrefined) meanwhile.",
            "model",
        )
    return PromptNotReadyError(
        f"Prompt {status.prompt_id} was not stored: its refinement {status.status} ({status.reason}). Send the same "
        "POST /v1/prompts request again to refine it anew.",
        "model",
    )


class Service:
    """Everything the routes share: the model parts, the store, the batcher, the context cache and the metrics."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        store: PromptStore,
        batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
        max_batch: int = DEFAULT_MAX_BATCH,
        context_cache_size: int = DEFAULT_CONTEXT_CACHE_SIZE,
        model_name: Optional[str] = None,
        max_shots: int = DEFAULT_MAX_SHOTS,
        max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_refine_jobs: int = DEFAULT_MAX_REFINE_JOBS,
    ) -> None:
        model.eval()
        self.parts = ModelParts.from_model(model)
        self.lm, self.template, self.tuner = self.parts.lm, self.parts.template, self.parts.tuner
        self.tokenizer = tokenizer
        self.store = store
        limits = {"max_shots": max_shots, "max_request_tokens": max_request_tokens, "max_streams": max_streams,
                  "max_refine_jobs": max_refine_jobs}
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        self.max_shots, self.max_request_tokens, self.max_streams = max_shots, max_request_tokens, max_streams
        self.max_refine_jobs = max_refine_jobs
        self.model_name = model_name or getattr(self.lm.config, "name_or_path", None) or type(self.lm).__name__
        self.limit = max_context_length(self.lm)
        self.vocab_size = self.lm.get_input_embeddings().num_embeddings
        self.started_at = time.time()
        self.metrics = ServerMetrics()
        self.runner = ModelRunner()
        # Store calls block (file I/O, SQLite locks) and may wait on the model thread (`make`): never on the loop, and
        # never in the model thread (which must never wait on them).
        self.store_executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="peft-metal-store")
        # A job's row is written in one thread, in the order asked (its start before any cancel of it).
        self.job_rows = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="peft-metal-jobs")
        self.batcher = Batcher(self.runner, self._run_batch, batch_window_ms / 1000.0, max_batch, self.metrics)
        self.contexts = ContextCache(context_cache_size, self.metrics)
        self.tokenizer_lock = threading.Lock()  # the tokenizer is shared by the loop and the model thread
        # Prompt making (the PGM pass, refinement) tokenizes in the model thread for as long as it runs: its own copy,
        # so the loop never waits seconds on the lock.
        self.pgm_tokenizer = copy.deepcopy(tokenizer)
        self.pad_id = self._pad_id()
        self.eos_ids = eos_token_ids(self.lm, self.tokenizer)
        self.plain = PromptEntry(key=None, context=empty_context(), template=self.template)
        self._creating: dict[str, asyncio.Future] = {}
        self._refining: dict[str, _RefineJob] = {}  # refinements running, by the refined prompt's id
        self._open_streams = 0
        self._plain_fingerprint: Optional[dict[str, Any]] = None
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

    def _job_row(self, function: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        """A write of a job's row, queued now (so rows are written in the order asked) and done even if whoever
        awaits it is cancelled."""
        return asyncio.shield(asyncio.wrap_future(self.job_rows.submit(function, *args)))

    # -------------------------------------------------------------------------------------------------- prompts

    async def create_prompt(
        self, task: str, shots: Any, num_demonstrations: int, refine_steps: int = 0, wait: Optional[float] = None,
        calibrate: bool = False,
    ) -> tuple[Union[PromptCreated, PromptStatus], str]:
        """The stored prompt for these shots, made by the PGM unless the same request made it before, and what
        happened (CACHED or CREATED). With `refine_steps` the PGM's prompt is stored first (the unrefined prompt),
        then refined by a job, one step at a time between completions: ACCEPTED with the job's status, unless it
        finishes within `wait` seconds. With `calibrate`, the prompt returned ready also has its option prior
        recorded (`_calibrated`); a prompt still refining gets it from the request that finds it ready."""
        shots = self._check_shots(shots, num_demonstrations)
        refinement = self._refinement(refine_steps)
        unrefined_id, unrefined, cached = await self._stored(task, shots, num_demonstrations)
        if refinement is None:
            self.metrics.inc(self.metrics.store, "hit" if cached else "miss")
            made = self._created(unrefined_id, unrefined, num_demonstrations, 0, cached)
            return await self._with_prior(made, unrefined, shots, calibrate), CACHED if cached else CREATED
        prompt_id = prompt_key(task, shots, num_demonstrations, self.base_fingerprint, self._made_by(refinement))
        job = self._refining.get(prompt_id)
        if job is None:
            try:
                prompt = await self.in_store(self.store.get, prompt_id)
                self.metrics.inc(self.metrics.store, "hit")
                made = self._created(prompt_id, prompt, num_demonstrations, refine_steps, True)
                return await self._with_prior(made, prompt, shots, calibrate), CACHED
            except PromptNotFoundError:
                pass
            except DamagedPromptError as error:
                logger.warning("%s Refining it again.", error)
            job = self._refining.get(prompt_id)  # started by another request while the store was asked
        if job is None:
            job = self._start_job(_RefineJob(prompt_id, task, shots, num_demonstrations, refinement, unrefined_id), unrefined)
        if wait is not None:
            await asyncio.wait({job.runner}, timeout=wait)
            if job.runner.done():
                return await self._with_prior(self._finished(job), job.runner.result(), shots, calibrate), CREATED
        return job.status(), ACCEPTED

    def _check_shots(self, shots: Any, num_demonstrations: int) -> Shots:
        if self.tuner is None:
            raise NoPGMError("This server runs a plain LM without a PGM: it cannot generate prompts.")
        if isinstance(shots, (list, tuple)) and len(shots) > self.max_shots:
            raise InvalidRequestError(f"At most {self.max_shots} shots per prompt, got {len(shots)}.", "shots")
        try:
            shots = normalize_shots(shots)
        except (ValueError, TypeError) as error:
            raise InvalidRequestError(str(error), "shots") from None
        if not num_demonstrations < len(shots):
            raise InvalidRequestError(
                f"num_demonstrations={num_demonstrations} must be below the number of shots ({len(shots)}): "
                "at least one shot has to be left for the PGM to read.",
                "num_demonstrations",
            )
        return shots

    @staticmethod
    def _created(
        prompt_id: str, prompt: GeneratedPrompt, num_demonstrations: int, refine_steps: int, cached: bool
    ) -> PromptCreated:
        return PromptCreated(
            prompt_id=prompt_id,
            model=f"{METAL_MODEL_PREFIX}{prompt_id}",
            design=prompt.design,
            num_tokens=prompt.num_tokens,
            num_demonstrations=num_demonstrations,
            refine_steps=refine_steps,
            cached=cached,
            text=prompt.text if prompt.is_text else None,
        )

    async def _stored(self, task: str, shots: Shots, num_demonstrations: int) -> tuple[str, GeneratedPrompt, bool]:
        """(id, prompt, cached) of the PGM's prompt for these shots, made once however many requests ask at once."""
        made_by = self._made_by(None)
        key = prompt_key(task, shots, num_demonstrations, self.base_fingerprint, made_by)
        loop = asyncio.get_running_loop()
        pending = self._creating.get(key)
        if pending is not None and pending.get_loop() is loop:  # the same prompt is being made: wait for it
            prompt_id, prompt, _ = await asyncio.shield(pending)
            return prompt_id, prompt, True
        # A task of its own: a client going away does not cancel a generation others may be waiting for.
        making = self._creating[key] = loop.create_task(self._get_or_create(task, shots, num_demonstrations, made_by))
        making.add_done_callback(lambda done: self._creating.pop(key) if self._creating.get(key) is done else None)
        return await asyncio.shield(making)

    def _refinement(self, refine_steps: int) -> Optional[Refinement]:
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or not 0 <= refine_steps <= MAX_REFINE_STEPS:
            raise InvalidRequestError(
                f"refine_steps must be an int from 0 to {MAX_REFINE_STEPS}, got {refine_steps!r}.", "refine_steps"
            )
        return Refinement(refine_steps) if refine_steps else None

    def _made_by(self, refinement: Optional[Refinement]) -> dict[str, Any]:
        """What makes the prompt, for its id: the PGM, and the refinement (with the rate it resolves to) if any. An
        unrefined prompt keeps the id it had before refinement existed."""
        if refinement is None:
            return self.pgm_config
        return {**self.pgm_config, "refinement": dataclasses.asdict(refinement.resolved())}

    async def _get_or_create(self, task: str, shots: Shots, num_demonstrations: int, made_by: dict[str, Any]):
        loop = asyncio.get_running_loop()

        def make() -> GeneratedPrompt:  # called in a store thread; the PGM passes run in the model thread
            return asyncio.run_coroutine_threadsafe(self._generate(shots, num_demonstrations), loop).result()

        return await self.in_store(
            self.store.get_or_create, task, shots, num_demonstrations, self.base_fingerprint, made_by, make
        )

    async def _generate(self, shots: Shots, num_demonstrations: int) -> GeneratedPrompt:
        """The PGM's prompt, one pass per chunk of shots, with waiting completions served between passes."""
        passes = await self.runner.run(
            self.tuner.prompt_passes, shots, self.pgm_tokenizer, num_demonstrations, "auto"
        )
        prompt = None
        while (made := await self.batcher.run_step(next, passes, None)) is not None:
            prompt = made
        return prompt

    async def _with_prior(
        self, made: PromptCreated, prompt: GeneratedPrompt, shots: Shots, calibrate: bool
    ) -> PromptCreated:
        if not calibrate:
            return made
        return made.model_copy(update={"option_prior": await self._calibrated(made.prompt_id, prompt, shots)})

    async def _calibrated(self, prompt_id: str, prompt: GeneratedPrompt, shots: Shots) -> dict[str, float]:
        """The option prior recorded for a stored prompt; read on its shots and recorded first if it has none. The
        labels are the shots' distinct outputs; each shot's input is read after the prompt (and its demonstrations)
        as a templated query, every label scored as its answer, and the mean of their distributions taken
        (`inference.option_prior`). The shots are read a batch at a time, completions served between batches."""
        prior = await self.in_store(self.store.option_prior, prompt_id)
        if prior is not None:
            return prior
        template = _template_of(prompt, self.template)
        labels = list(dict.fromkeys(output for _, output in shots))
        queries = [self.encode(template.format_query(text)) for text, _ in shots]
        label_ids = [self.encode(template.format_answer(label)) for label in labels]

        def read_prompt() -> Context:
            with self.parts.lora_off():
                context = prompt_context(self.lm, prompt.to(model_device(self.lm)))
            check_fits(self.lm, context.length, max(map(len, queries)), max(map(len, label_ids)), "longest label")
            return context

        def score(batch: list[list[int]]) -> list[tuple[list[str], list[float]]]:
            rows = score_options(self.lm, context, batch, [label_ids] * len(batch))
            return [(labels, [score.mean_logprob for score in row]) for row in rows]

        context = await self.batcher.run_step(read_prompt)
        scored = []
        for start in range(0, len(queries), CALIBRATION_BATCH):
            scored += await self.batcher.run_step(score, queries[start : start + CALIBRATION_BATCH])
        prior = option_prior(scored)
        await self.in_store(self.store.put_option_prior, prompt_id, prior)
        return prior

    # ------------------------------------------------------------------------------------------ refinement jobs

    def _start_job(self, job: _RefineJob, unrefined: GeneratedPrompt) -> _RefineJob:
        if len(self._refining) >= self.max_refine_jobs:
            self.metrics.inc(self.metrics.refine_jobs_refused)
            retry_after = max(1, math.ceil(min(running.seconds_left() for running in self._refining.values())))
            raise TooManyJobsError(
                f"This server refines at most {self.max_refine_jobs} prompts at once (--max-refine-jobs) and is "
                f"refining {len(self._refining)}; retry in about {retry_after} s, or send refine_steps 0.",
                retry_after, "refine_steps",
            )
        self._refining[job.prompt_id] = job
        self.metrics.refine_jobs.set(len(self._refining))
        job.begun = self._job_row(self.store.begin_job, job.prompt_id, job.task, job.refinement.steps, job.unrefined_id)
        job.runner = asyncio.get_running_loop().create_task(self._refine(job, unrefined))
        job.runner.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: never logged
        return job

    async def _refine(self, job: _RefineJob, unrefined: GeneratedPrompt) -> GeneratedPrompt:
        """The job: its row, one refinement step at a time between completions, then the refined prompt stored (only
        then: a job that dies stores nothing) and its row dropped. A failure is recorded with its reason."""
        outcome = FAILED
        try:
            await job.begun
            split = len(job.shots) - job.num_demonstrations
            start_tuning = functools.partial(self.tuner.prompt_tuning, **dataclasses.asdict(job.refinement))
            tuning = await self.runner.run(
                start_tuning, unrefined.to(model_device(self.lm)), job.shots[:split], self.pgm_tokenizer
            )
            while not tuning.done:
                seconds = await self.batcher.run_step(_timed, tuning.step)
                job.steps_done, job.step_seconds = tuning.steps_done, job.step_seconds + seconds
                self.metrics.observe(self.metrics.refine_step_seconds, seconds)
            prompt = tuning.result()
            await self.in_store(
                self.store.put, job.task, job.shots, job.num_demonstrations, self.base_fingerprint,
                self._made_by(job.refinement), prompt,
            )
            await self._job_row(self.store.end_job, job.prompt_id)
            outcome = "ready"
            return prompt
        except asyncio.CancelledError:  # cancelled or shut down: whoever cancelled it recorded why
            outcome = CANCELLED
            raise
        except Exception as error:
            reason = f"{type(error).__name__} at step {job.steps_done + 1} of {job.refinement.steps}: {error}"
            await self._job_row(self.store.end_job, job.prompt_id, FAILED, reason)
            raise
        finally:
            if self._refining.get(job.prompt_id) is job:
                del self._refining[job.prompt_id]
            self.metrics.refine_jobs.set(len(self._refining))
            self.metrics.observe(self.metrics.refine_job_seconds, time.perf_counter() - job.started, outcome)

    def _finished(self, job: _RefineJob) -> PromptCreated:
        """A job that ended while a request waited for it: its prompt, or why there is none."""
        if job.runner.cancelled():
            raise _not_ready(PromptStatus(
                prompt_id=job.prompt_id, model=f"{METAL_MODEL_PREFIX}{job.prompt_id}", status=CANCELLED,
                reason="cancelled while this request waited",
            ))
        prompt = job.runner.result()  # a failure is raised as it happened
        return self._created(job.prompt_id, prompt, job.num_demonstrations, job.refinement.steps, False)

    async def cancel_refinement(self, prompt_id: str) -> PromptStatus:
        """Stop refining `prompt_id`: nothing is stored, and its status says cancelled."""
        job = self._refining.get(prompt_id)
        if job is None:
            status = await self.prompt_status(prompt_id)
            hint = f" (DELETE /v1/prompts/{prompt_id} removes a stored prompt)" if status.status == "ready" else ""
            raise NotRefiningError(
                f"Prompt {prompt_id} is {status.status}: only a prompt being refined can be cancelled{hint}.", "prompt_id"
            )
        reason = f"cancelled by a client after {job.steps_done} of {job.refinement.steps} steps"
        self._stop(job)
        await self._job_row(self.store.end_job, prompt_id, CANCELLED, reason)
        return PromptStatus(**{**job.status().model_dump(), "status": CANCELLED, "reason": reason})

    def _stop(self, job: _RefineJob) -> None:
        del self._refining[job.prompt_id]
        self.metrics.refine_jobs.set(len(self._refining))
        job.runner.cancel()

    async def prompt_status(self, prompt_id: str) -> PromptStatus:
        """A prompt's status: refining (a job of this server, or of another on the same store), ready (stored, with
        its row: `prompt_info`), failed or cancelled (with the reason)."""
        job = self._refining.get(prompt_id)
        if job is not None:
            return job.status()
        try:
            info = await self.prompt_info(prompt_id)
        except PromptNotFoundError:
            row = await self.in_store(self.store.job, prompt_id)
            if row is None:
                raise
            return _status_of_row(row)
        return PromptStatus(**{**info, "model": f"{METAL_MODEL_PREFIX}{prompt_id}", "status": "ready"})

    async def prompt_info(self, prompt_id: str) -> dict[str, Any]:
        """The index row and, from the prompt's file (a read, not a use: no hit is counted), its `refinement` (the
        gradient steps it was tuned by, if any), its `option_prior` if it was made with calibrate, and, for a prompt
        of vocabulary tokens, its `token_ids` and `text` (plain text any LM service can use) and the demonstrations'
        text."""
        info = await self.in_store(self.store.info, prompt_id)
        prompt = await self.in_store(self.store.get, prompt_id, "cpu", False)
        info["refinement"] = prompt.refinement
        prior = await self.in_store(self.store.option_prior, prompt_id)
        if prior is not None:
            info["option_prior"] = prior
        if prompt.is_text:
            info.update(token_ids=prompt.token_ids.tolist(), text=prompt.text, demonstrations_text=prompt.demonstrations_text)
        return info

    async def delete_prompt(self, prompt_id: str) -> None:
        """Remove a stored prompt, or cancel its refinement; either way its job record goes too."""
        job = self._refining.get(prompt_id)
        if job is not None:
            self._stop(job)
        self.contexts.evict(prompt_id)
        try:
            deleted = await self.in_store(self.store.delete, prompt_id)
            had_job = await self.in_store(self.store.job, prompt_id) is not None
            await self._job_row(self.store.end_job, prompt_id)
        finally:
            self.contexts.evict(prompt_id)  # again: a load that finished meanwhile must not stay cached
        if not (deleted or had_job or job is not None):
            raise PromptNotFoundError(f"No prompt with id {prompt_id!r} in this store.")

    async def entry(self, prompt_id: str) -> PromptEntry:
        return await self.contexts.get(prompt_id, self._load_entry)

    async def _load_entry(self, prompt_id: str) -> PromptEntry:
        prompt = await self.in_store(self.store.get, prompt_id)
        try:
            check_same_base(prompt.base_fingerprint, self.base_fingerprint or self._fingerprint())
        except ValueError as error:
            raise IncompatiblePromptError(f"Stored prompt {prompt_id} cannot be served by this model: {error}") from None

        def read() -> PromptEntry:
            with self.parts.lora_off():
                context = prompt_context(self.lm, prompt.to(model_device(self.lm)))
            return PromptEntry(key=prompt_id, context=context, design=prompt.design, template=_template_of(prompt, self.template))

        return await self.runner.run(read)

    def _fingerprint(self) -> dict[str, Any]:
        if self._plain_fingerprint is None:
            self._plain_fingerprint = base_model_fingerprint(self.lm)
        return self._plain_fingerprint

    async def models(self) -> ModelList:
        """The base model, and every stored prompt as `metal:<prompt_id>` (the base model reading that prompt first)."""
        created = int(self.started_at)
        data = [ModelCard(id=self.model_name, created=created, owned_by="peft-metal")]
        for row in await self.in_store(self.store.list):
            data.append(
                ModelCard(
                    id=f"{METAL_MODEL_PREFIX}{row['prompt_id']}", created=_unix_time(row["created_at"], created),
                    owned_by="peft-metal", root=self.model_name, parent=self.model_name,
                )
            )
        return ModelList(data=data)

    # ---------------------------------------------------------------------------------------------- completions

    async def _model_entry(self, model: str) -> PromptEntry:
        if model == self.model_name:
            return self.plain
        if model.startswith(METAL_MODEL_PREFIX):
            prompt_id = model[len(METAL_MODEL_PREFIX) :]
            job = self._refining.get(prompt_id)
            if job is not None:
                raise _not_ready(job.status())
            try:
                return await self.entry(prompt_id)
            except PromptNotFoundError:
                row = await self.in_store(self.store.job, prompt_id)
                if row is None:
                    raise
                raise _not_ready(_status_of_row(row)) from None
        raise ModelNotFoundError(
            f"Unknown model {model!r}: use {self.model_name!r} (the base model) or metal:<prompt_id> for a stored "
            "prompt (GET /v1/models lists them).",
            "model",
        )

    def _prompt_items(self, prompt: Any) -> list[Any]:
        """The request's prompts: texts or token id lists."""
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("prompt is an empty list: send a text, a list of texts or token ids.", "prompt")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        if len(prompt) > MAX_INPUTS_PER_REQUEST:
            raise InvalidRequestError(f"At most {MAX_INPUTS_PER_REQUEST} prompts per request, got {len(prompt)}.", "prompt")
        return list(prompt)

    async def _resolve(self, body: CompletionRequest) -> _Completion:
        """Every check a completion request needs, once, before any model work."""
        if body.suffix is not None:
            raise InvalidRequestError("suffix is not supported: send it as part of the prompt.", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise InvalidRequestError("best_of is not supported beyond n: leave it out or set it to n.", "best_of")
        entry = await self._model_entry(body.model)
        template = (entry.template or self.template) if body.template else None
        items = self._prompt_items(body.prompt)
        prefix: list[int] = []
        if body.shots is not None:
            if entry.key is not None:
                raise InvalidRequestError("shots go with the base model only; a stored prompt has its own.", "shots")
            prefix = self.encode((entry.template or self.template).format_shots(as_shots(body.shots)))
        queries = []
        for index, item in enumerate(items):
            if isinstance(item, str):
                ids = self.encode(template.format_query(item) if template is not None else item)
            elif template is not None:
                raise InvalidRequestError("template formats text: send the prompt as text, not token ids.", "prompt")
            else:
                ids = list(item)
                if any(not 0 <= token < self.vocab_size for token in ids):
                    raise InvalidRequestError(f"prompt {index} holds a token id outside 0..{self.vocab_size - 1}.", "prompt")
            if not prefix + ids:
                raise InvalidRequestError(f"prompt {index} has no tokens: send some text.", "prompt")
            queries.append(prefix + ids)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS or any(not stop for stop in stops):
            raise InvalidRequestError(f"stop takes at most {MAX_STOPS} non-empty strings.", "stop")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        options = None
        if body.options is not None:
            options = self._option_ids(body, template)
            check_fits(self.lm, entry.context.length, max(map(len, queries)), max(map(len, options)), "longest option")
        else:
            if max_tokens == 0 and not body.echo:
                raise InvalidRequestError("max_tokens 0 generates nothing: set echo to score the prompt.", "max_tokens")
            check_fits(self.lm, entry.context.length, max(map(len, queries)), max_tokens)
        self._check_request_tokens(queries, options, body.n, max_tokens)
        prior = await self._prior_of(body, entry) if body.calibrate else None
        return _Completion(entry, template, queries, options, stops, body.n, max_tokens, option_prior=prior)

    async def _prior_of(self, body: CompletionRequest, entry: PromptEntry) -> dict[str, float]:
        """The stored prompt's option prior that a calibrated request divides out, with every reason it cannot."""
        if body.options is None:
            raise InvalidRequestError("calibrate calibrates a choice among options: send options too.", "calibrate")
        if entry.key is None:
            raise InvalidRequestError(
                "calibrate divides out a stored prompt's option prior; the base model has none: complete with "
                "metal:<prompt_id> of a prompt made with calibrate: true.", "calibrate"
            )
        if not body.template:
            raise InvalidRequestError(
                "calibrate needs template: true: the prior was read on the shots formatted with the template.", "template"
            )
        prior = await self.in_store(self.store.option_prior, entry.key)
        if prior is None:
            raise InvalidRequestError(
                f"Prompt {entry.key} has no option prior: send its POST /v1/prompts again with calibrate: true (the "
                "same shots give the same prompt) to record one.", "calibrate"
            )
        unknown = [option for option in body.options if option not in prior]
        if unknown:
            raise InvalidRequestError(
                f"options {unknown} are not among the labels of the prompt's shots {sorted(prior)}, so the prompt has "
                "no prior for them: calibrate only among those labels.", "options"
            )
        return prior

    def _check_request_tokens(
        self, queries: list[list[int]], options: Optional[list[list[int]]], n: int, max_tokens: int
    ) -> None:
        """One request may make the LM read and write at most `max_request_tokens`: its prompts (with formatting and
        shots), then the options scored after each, or n choices of up to max_tokens new tokens each."""
        read = sum(len(query) for query in queries)
        more = len(queries) * (sum(map(len, options)) if options is not None else n * max_tokens)
        if read + more > self.max_request_tokens:
            what = "scores its options over" if options is not None else f"may generate (n={n} x max_tokens={max_tokens})"
            raise RequestTooLargeError(
                f"This request reads {read} prompt tokens (with their formatting and shots) and {what} {more} more; "
                f"this server handles at most {self.max_request_tokens} tokens per request. Lower max_tokens or n, "
                "or split the prompts over several requests.",
                "prompt" if read >= more else ("options" if options is not None else "max_tokens"),
            )

    def _option_ids(self, body: CompletionRequest, template: Optional[ShotTemplate]) -> list[list[int]]:
        for name, conflict in (("stream", body.stream), ("echo", body.echo), ("logprobs", body.logprobs is not None), ("n", body.n > 1)):
            if conflict:
                raise InvalidRequestError(f"options (scoring) does not combine with {name}.", name)
        if any(not option.strip() for option in body.options):
            raise InvalidRequestError("options holds a blank option; every option needs some text.", "options")
        if len(set(body.options)) != len(body.options):
            raise InvalidRequestError(f"options has duplicates: {body.options!r}.", "options")
        options = [self.encode(template.format_answer(o) if template is not None else o) for o in body.options]
        if any(not ids for ids in options):
            raise InvalidRequestError("An option encodes to no tokens; every option must have at least one token.", "options")
        return options

    def _sampling(self, body: CompletionRequest, plan: _Completion, row: int, on_token=None) -> Sampling:
        generator = None
        if body.temperature > 0 and body.seed is not None:
            generator = torch.Generator().manual_seed((body.seed + row) % 2**64)  # any int, as OpenAI takes
        return Sampling(
            max_new_tokens=plan.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            generator=generator,
            stop=self._stop_check(plan),
            logprobs=body.logprobs,
            on_token=on_token,
        )

    def _stop_check(self, plan: _Completion) -> Optional[Callable[[list[int]], bool]]:
        if not plan.stops and plan.template is None:
            return None

        def stop(tokens: list[int]) -> bool:
            text = self.decode(tokens)
            return any(s in text for s in plan.stops) or (plan.template is not None and has_stop(text, plan.template))

        return stop

    def _answer(self, plan: _Completion, text: str) -> str:
        """Generated text up to the first stop string (with template, the answer as evaluation cuts it)."""
        ends = [text.find(stop) for stop in plan.stops if stop in text]
        text = text[: min(ends)] if ends else text
        return cut_generation(text, plan.template) if plan.template is not None else text

    def _jobs(self, body: CompletionRequest, plan: _Completion, on_token=None) -> list[Job]:
        jobs = []
        for index, query in enumerate(plan.queries):
            if plan.options is not None:
                jobs.append(Job(kind=OPTIONS, query=query, options=plan.options))
                continue
            if body.echo:
                jobs.append(Job(kind=ECHO, query=query, top=body.logprobs or 0))
            if plan.max_tokens > 0:
                for j in range(plan.n):
                    row = index * plan.n + j
                    callback = (lambda token, row=row: on_token(row, token)) if on_token is not None else None
                    jobs.append(Job(kind=GENERATE, query=query, sampling=self._sampling(body, plan, row, callback)))
        return jobs

    async def complete(self, body: CompletionRequest) -> CompletionResponse:
        plan = await self._resolve(body)
        results = iter(await self.batcher.submit(plan.entry, self._jobs(body, plan)))
        choices, completion_tokens = [], 0
        for index, query in enumerate(plan.queries):
            if plan.options is not None:
                choices.append(self._option_choice(body, index, next(results), plan.option_prior))
                continue
            echoed: Optional[list[TokenLogprob]] = next(results) if body.echo else None
            for j in range(plan.n):
                generation = next(results) if plan.max_tokens > 0 else Generation([], "length")
                completion_tokens += len(generation.tokens)
                choices.append(self._choice(body, plan, index * plan.n + j, query, echoed, generation))
        prompt_tokens = sum(len(query) for query in plan.queries)
        usage = Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens,
            stored_prompt_tokens=plan.entry.context.length if plan.entry.key is not None else 0,
        )
        return CompletionResponse(id=plan.id, created=plan.created, model=body.model, choices=choices, usage=usage)

    def _option_choice(
        self, body: CompletionRequest, index: int, scores: list[ContinuationScore], prior: Optional[dict[str, float]]
    ) -> CompletionChoice:
        means = [s.mean_logprob for s in scores]
        calibrated = calibrated_scores(body.options, means, prior) if prior is not None else [None] * len(scores)
        best = best_option(calibrated if prior is not None else means)
        option_scores = [
            OptionScore(option=option, mean_logprob=s.mean_logprob, sum_logprob=s.sum_logprob, num_tokens=s.num_tokens,
                        calibrated_logprob=c)
            for option, s, c in zip(body.options, scores, calibrated)
        ]
        return CompletionChoice(text=body.options[best], index=index, finish_reason="stop", option_scores=option_scores)

    def _choice(
        self,
        body: CompletionRequest,
        plan: _Completion,
        index: int,
        query: list[int],
        echoed: Optional[list[TokenLogprob]],
        generation: Generation,
    ) -> CompletionChoice:
        raw = self.decode(generation.tokens)
        text = self._answer(plan, raw)
        cut = len(text) < len(raw) or generation.finish_reason in (STOP, EOS)
        prefix = self.decode(query) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = self._logprobs(echoed or [], generation, kept_chars=raw.find(text) + len(text) if cut else None)
        return CompletionChoice(
            text=prefix + text, index=index, logprobs=logprobs, finish_reason="stop" if cut else "length"
        )

    def _logprobs(self, echoed: list[TokenLogprob], generation: Generation, kept_chars: Optional[int]) -> Logprobs:
        """OpenAI's logprobs object over the echoed prompt tokens, then the generated ones up to where the text was
        cut (`kept_chars` of the generated text)."""
        tokens, values, tops, offsets, offset = [], [], [], [], 0
        for item in echoed:
            piece = self.decode([item.token_id])
            tokens.append(piece), values.append(item.logprob), offsets.append(offset)
            tops.append({self.decode([t]): v for t, v in item.top.items()} if item.logprob is not None else None)
            offset += len(piece)
        generated = 0
        new_tokens = generation.tokens + ([generation.eos_token] if generation.eos_token is not None else [])
        for token, value, top in zip(new_tokens, generation.token_logprobs, generation.top_logprobs):
            if kept_chars is not None and generated >= kept_chars and token != generation.eos_token:
                break
            piece = self.decode([token])
            tokens.append(piece), values.append(value), offsets.append(offset)
            tops.append({self.decode([t]): v for t, v in top.items()})
            offset += len(piece)
            generated += len(piece)
        return Logprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)

    async def open_stream(self, body: CompletionRequest) -> tuple[AsyncIterator[dict[str, Any]], Callable[[], None]]:
        """Checks the request and reserves a stream slot (so refusals come before any byte is sent); returns the
        chunks (text as it is generated, per choice, then a last chunk per choice with its finish reason) and the
        slot's release, which the chunks call when they end and the caller calls too in case they never start (a
        client gone before the first byte); releasing twice is harmless."""
        if body.logprobs is not None:
            raise InvalidRequestError("logprobs is not returned when streaming: leave stream off to get them.", "logprobs")
        if body.options is not None:
            raise InvalidRequestError("options (scoring) does not combine with stream.", "stream")
        plan = await self._resolve(body)
        if self._open_streams >= self.max_streams:
            raise TooManyStreamsError(
                f"This server streams at most {self.max_streams} completions at once; retry shortly or set stream off."
            )
        self._open_streams += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open_streams -= 1

        return self._stream(body, plan, release), release

    async def _stream(
        self, body: CompletionRequest, plan: _Completion, release: Callable[[], None]
    ) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        arrivals: asyncio.Queue = asyncio.Queue()
        num_rows = len(plan.queries) * plan.n

        def on_token(row: int, token: int) -> None:  # in the model thread
            loop.call_soon_threadsafe(arrivals.put_nowait, (row, token))

        def chunk(index: int, text: str, finish_reason: Optional[str] = None) -> dict[str, Any]:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
            return {"id": plan.id, "object": "text_completion", "created": plan.created, "model": body.model, "choices": [choice]}

        submitted = loop.create_task(self.batcher.submit(plan.entry, self._jobs(body, plan, on_token)))
        submitted.add_done_callback(lambda _: arrivals.put_nowait(None))
        tokens: list[list[int]] = [[] for _ in range(num_rows)]
        sent = [""] * num_rows
        holdback = max((len(stop) for stop in [*plan.stops, "\n", plan.template.shot_separator if plan.template else ""]), default=1) - 1
        try:
            if body.echo:
                for row in range(num_rows):
                    yield chunk(row, self.decode(plan.queries[row // plan.n]))
            while (arrival := await arrivals.get()) is not None:
                row, token = arrival
                tokens[row].append(token)
                safe = self._answer(plan, self.decode(tokens[row]))
                safe = safe[: max(0, len(safe) - holdback)] if not safe.endswith("\ufffd") else ""
                if len(safe) > len(sent[row]) and safe.startswith(sent[row]):
                    yield chunk(row, safe[len(sent[row]) :])
                    sent[row] = safe
            results = [result for result in submitted.result() if isinstance(result, Generation)]
            completion_tokens = 0
            for row, generation in enumerate(results):
                raw = self.decode(generation.tokens)
                text = self._answer(plan, raw)
                cut = len(text) < len(raw) or generation.finish_reason in (STOP, EOS)
                rest = text[len(sent[row]) :] if text.startswith(sent[row]) else ""
                completion_tokens += len(generation.tokens)
                yield chunk(row, rest, "stop" if cut else "length")
            if body.stream_options is not None and body.stream_options.include_usage:
                prompt_tokens = sum(len(query) for query in plan.queries)
                usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens)
                yield {"id": plan.id, "object": "text_completion", "created": plan.created, "model": body.model,
                       "choices": [], "usage": usage.model_dump()}
        finally:
            release()
            if not submitted.done():
                submitted.cancel()

    def _run_batch(self, entry: PromptEntry, jobs: list[Job]) -> list[Any]:
        """In the model thread: one batched LM call for jobs of one kind after the same context."""
        queries = [job.query for job in jobs]
        with self.parts.lora_off():
            if jobs[0].kind == OPTIONS:
                return score_options(self.lm, entry.context, queries, [job.options for job in jobs], self.pad_id)
            if jobs[0].kind == ECHO:
                return [score_tokens(self.lm, entry.context, job.query, job.top) for job in jobs]
            return generate(
                self.lm, entry.context, queries, [job.sampling for job in jobs], eos_token_ids=self.eos_ids, pad_id=self.pad_id
            )

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_name,
            "design": self.tuner.metal_config.prompt_design if self.tuner is not None else None,
            "max_context": self.limit,
            "batch_window_ms": self.batcher.window_s * 1000.0,
            "max_batch": self.batcher.max_batch,
            "cached_contexts": len(self.contexts),
            "open_streams": self._open_streams,
            "refine_jobs": len(self._refining),
        }

    def close(self) -> None:
        """Stop batching and every refinement job, each recorded as failed with the reason (nothing of it stored)."""
        self.batcher.cancel()
        recorded = []
        for job in list(self._refining.values()):
            self._stop(job)
            reason = (
                f"the server stopped after {job.steps_done} of {job.refinement.steps} steps; nothing was stored: send "
                "the same request again to refine it anew"
            )
            recorded.append(self.job_rows.submit(self.store.end_job, job.prompt_id, FAILED, reason))
        concurrent.futures.wait(recorded)
