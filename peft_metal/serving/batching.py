"""Micro-batching of completion requests, the single model thread, and the LRU cache of prompt contexts.

* `ModelRunner`: every torch call (the PGM making a prompt, the LM reading one) runs in one worker thread, so they are
  never concurrent (LoRA on/off is module state: a PGM pass must never overlap an LM read).
* `Batcher`: one asyncio queue per prompt id (the plain LM has its own). A worker takes the first waiting input,
  collects more for up to `window_s` (never more than `max_batch`), and hands them to the model thread as one batched
  call; what arrived while the model was busy is taken at once (up to `max_batch`) without waiting a window again.
* `Batcher.run_step`: one unit of long work (a PGM pass over a chunk of shots, a refinement step) in the model
  thread, after which every completion waiting by then is served before the next unit of any such work: a completion
  waits for about one unit, never for a whole refinement.
* `ContextCache`: a prompt's context (the LM's keys/values after reading the prompt and its demonstrations) by prompt
  id, computed once and kept in an LRU; concurrent misses for one id load it once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable, Optional, Sequence

import torch

from ..inference import Context, Sampling
from ..metal_prompt.template import ShotTemplate
from .metrics import ServerMetrics

GENERATE = "generate"
OPTIONS = "options"
ECHO = "echo"  # log-probabilities of the prompt's own tokens


class ModelRunner:
    """One thread for all model work, so PGM passes and LM reads are serialized."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peft-metal-model")

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, _no_grad(function), *args)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """From another (non-event-loop) thread: run in the model thread and wait for the result."""
        return self._executor.submit(_no_grad(function), *args).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _no_grad(function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any) -> Any:
        with torch.no_grad():
            return function(*args)

    return wrapped


@dataclass(frozen=True)
class PromptEntry:
    """What every input of one prompt is read after: `key` is the prompt id (None for the plain LM)."""

    key: Optional[str]
    context: Context
    design: Optional[str] = None
    template: Optional[ShotTemplate] = None  # how inputs are formatted (the prompt's PGM's template)


@dataclass
class Job:
    """One input of a completion request: its query token ids and what to do with them."""

    kind: str  # GENERATE, OPTIONS or ECHO
    query: list[int]
    sampling: Optional[Sampling] = None  # GENERATE
    options: Optional[list[list[int]]] = None  # OPTIONS
    top: int = 0  # ECHO: alternatives per token
    future: Optional[asyncio.Future] = field(default=None, repr=False)


# Runs in the model thread: (entry, jobs of one kind) -> one result per job.
BatchFunction = Callable[[PromptEntry, list[Job]], list[Any]]


class Batcher:
    def __init__(self, runner: ModelRunner, run_batch: BatchFunction, window_s: float, max_batch: int, metrics: ServerMetrics) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}.")
        if window_s < 0:
            raise ValueError(f"The batch window must not be negative, got {window_s}.")
        self.runner, self.run_batch = runner, run_batch
        self.window_s, self.max_batch = window_s, max_batch
        self.metrics = metrics
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._queues: dict[Hashable, asyncio.Queue] = {}
        self._workers: dict[Hashable, asyncio.Task] = {}
        self._waiting = 0
        self._pending: set[asyncio.Future] = set()  # completion inputs submitted and not answered
        self._step_lock: Optional[asyncio.Lock] = None  # one unit of long work at a time, between completions

    def _bind(self) -> None:
        """Queues belong to one event loop; a new loop (another test client, say) starts afresh."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._queues, self._workers, self._waiting = loop, {}, {}, 0
            self._pending, self._step_lock = set(), asyncio.Lock()

    async def submit(self, entry: PromptEntry, jobs: Sequence[Job]) -> list[Any]:
        """Queue the jobs behind `entry`'s prompt and wait for all their results."""
        self._bind()
        loop = asyncio.get_running_loop()
        queue = self._queues.get(entry.key)
        if queue is None:
            queue = self._queues[entry.key] = asyncio.Queue()
            self._workers[entry.key] = loop.create_task(self._work(entry.key, queue))
        for job in jobs:
            job.future = loop.create_future()
            self._pending.add(job.future)
            job.future.add_done_callback(self._pending.discard)
            queue.put_nowait((entry, job))
        self._waiting += len(jobs)
        self.metrics.queue_depth.set(self._waiting)
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        except asyncio.CancelledError:  # the client went away: its queued jobs are skipped
            for job in jobs:
                job.future.cancel()
            raise

    async def run_step(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in the model thread, then wait until every completion input submitted by then is
        answered, so units of long work (of any number of jobs, one at a time) and batches of completions take turns;
        a completion arriving later waits for at most the next unit."""
        self._bind()
        async with self._step_lock:
            result = await self.runner.run(function, *args)
            waiting = [future for future in self._pending if not future.done()]
            if waiting:
                await asyncio.wait(waiting)
        return result

    async def _collect(self, queue: asyncio.Queue) -> list[tuple[PromptEntry, Job]]:
        batch = [await queue.get()]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self, key: Hashable, queue: asyncio.Queue) -> None:
        while True:
            batch = await self._collect(queue)
            self._waiting -= len(batch)
            self.metrics.queue_depth.set(self._waiting)
            live = [(entry, job) for entry, job in batch if not job.future.done()]
            if live:
                await self._run(live)
            if queue.empty():  # idle: retire; the next submit starts a new worker (no await in between)
                if self._queues.get(key) is queue:
                    del self._queues[key], self._workers[key]
                return

    async def _run(self, batch: list[tuple[PromptEntry, Job]]) -> None:
        entry = batch[0][0]  # all entries of one queue are the same prompt
        for kind in (GENERATE, OPTIONS, ECHO):
            jobs = [job for _, job in batch if job.kind == kind]
            if not jobs:
                continue
            start = time.perf_counter()
            try:
                results = await self.runner.run(self.run_batch, entry, jobs)
            except Exception as error:  # noqa: BLE001  (handed to every waiting request)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            new_tokens = sum(len(getattr(result, "tokens", ())) for result in results)
            self.metrics.batch(kind, len(jobs), time.perf_counter() - start, new_tokens)
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)

    def cancel(self) -> None:
        for task in list(self._workers.values()):
            task.cancel()
        self._queues, self._workers = {}, {}


class ContextCache:
    """Prompt contexts by prompt id, least recently used evicted beyond `capacity`; one load per id at a time."""

    def __init__(self, capacity: int, metrics: ServerMetrics) -> None:
        if capacity < 1:
            raise ValueError(f"The context cache needs room for at least one prompt, got {capacity}.")
        self.capacity = capacity
        self.metrics = metrics
        self._entries: OrderedDict[str, PromptEntry] = OrderedDict()
        self._loading: dict[str, asyncio.Task] = {}
        self._generation: dict[str, int] = {}  # bumped by evict, so a load racing a delete is not cached
        self._lock = threading.Lock()

    async def get(self, prompt_id: str, load: Callable[[str], Awaitable[PromptEntry]]) -> PromptEntry:
        with self._lock:
            entry = self._entries.get(prompt_id)
            if entry is not None:
                self._entries.move_to_end(prompt_id)
        if entry is not None:
            self.metrics.inc(self.metrics.context_cache, "hit")
            return entry
        loop = asyncio.get_running_loop()
        task = self._loading.get(prompt_id)
        if task is None or task.get_loop() is not loop:
            self.metrics.inc(self.metrics.context_cache, "miss")
            # A task of its own, so a request that goes away does not cancel the load others wait for.
            task = self._loading[prompt_id] = loop.create_task(self._load(prompt_id, load))
        else:
            self.metrics.inc(self.metrics.context_cache, "hit")  # joins a load already under way
        return await asyncio.shield(task)

    async def _load(self, prompt_id: str, load: Callable[[str], Awaitable[PromptEntry]]) -> PromptEntry:
        generation = self._generation.get(prompt_id, 0)
        try:
            entry = await load(prompt_id)
            if self._generation.get(prompt_id, 0) == generation:  # not deleted meanwhile
                self._put(prompt_id, entry)
            return entry
        finally:
            if self._loading.get(prompt_id) is asyncio.current_task():
                del self._loading[prompt_id]

    def _put(self, prompt_id: str, entry: PromptEntry) -> None:
        with self._lock:
            self._entries[prompt_id] = entry
            self._entries.move_to_end(prompt_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            self.metrics.cached_contexts.set(len(self._entries))

    def evict(self, prompt_id: str) -> None:
        with self._lock:
            self._entries.pop(prompt_id, None)
            self._generation[prompt_id] = self._generation.get(prompt_id, 0) + 1
            self.metrics.cached_contexts.set(len(self._entries))

    def __contains__(self, prompt_id: object) -> bool:
        with self._lock:
            return prompt_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
