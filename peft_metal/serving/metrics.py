"""Prometheus metrics, written by hand in the text exposition format (no client library needed).

Everything is updated from the event loop thread, except counters bumped from the model thread, which go through the
same lock.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Iterable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
JOB_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape(str(value))}"' for name, value in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Counter:
    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(label_names)
        self.values: dict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[tuple(labels)] += amount

    def get(self, *labels: str) -> float:
        return self.values.get(tuple(labels), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        if not self.values and not self.label_names:
            yield f"{self.name} 0"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


class Gauge(Counter):
    def set(self, value: float, *labels: str) -> None:
        self.values[tuple(labels)] = value

    def render(self) -> Iterable[str]:
        lines = list(super().render())
        lines[1] = f"# TYPE {self.name} gauge"
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Sequence[float], label_names: Sequence[str] = ()) -> None:
        self.name, self.help, self.buckets, self.label_names = name, help_text, tuple(buckets), tuple(label_names)
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = defaultdict(float)

    def observe(self, value: float, *labels: str) -> None:
        counts = self.counts.setdefault(tuple(labels), [0] * (len(self.buckets) + 1))
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                counts[index] += 1
        counts[-1] += 1  # +Inf
        self.sums[tuple(labels)] += value

    def count(self, *labels: str) -> int:
        return self.counts.get(tuple(labels), [0])[-1]

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for labels, counts in sorted(self.counts.items()):
            for bound, count in zip((*self.buckets, "+Inf"), counts):
                le = f'le="{bound if bound == "+Inf" else _number(bound)}"'
                yield f"{self.name}_bucket{_labels(self.label_names, labels, le)} {count}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {_number(self.sums[labels])}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {counts[-1]}"


class ServerMetrics:
    """The service's metrics; `render()` gives the /metrics body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = Counter(
            "peft_metal_http_requests_total", "HTTP requests by route template, method and status code.",
            ("route", "method", "status"),
        )
        self.latency = Histogram(
            "peft_metal_http_request_duration_seconds", "HTTP request latency by route template and method.",
            LATENCY_BUCKETS, ("route", "method"),
        )
        self.store = Counter(
            "peft_metal_prompt_store_requests_total",
            "POST /v1/prompts outcomes: hit (an identical prompt was stored) or miss (the PGM generated it).",
            ("result",),
        )
        self.context_cache = Counter(
            "peft_metal_context_cache_requests_total",
            "Lookups of a prompt's read context in the in-memory LRU cache: hit, or miss (loaded from the store).",
            ("result",),
        )
        self.batch_size = Histogram(
            "peft_metal_batch_size", "Rows (inputs) per batched LM call.", BATCH_SIZE_BUCKETS, ("kind",)
        )
        self.batch_size_max = Gauge("peft_metal_batch_size_max", "Largest batch run so far.")
        self.batch_seconds = Histogram(
            "peft_metal_batch_duration_seconds", "Model time per batched LM call.", LATENCY_BUCKETS, ("kind",)
        )
        self.rows = Counter("peft_metal_completion_rows_total", "Inputs completed, by kind.", ("kind",))
        self.tokens = Counter("peft_metal_generated_tokens_total", "Tokens generated.")
        self.queue_depth = Gauge("peft_metal_queue_depth", "Inputs waiting to be batched.")
        self.cached_contexts = Gauge("peft_metal_cached_contexts", "Prompt contexts held in the LRU cache.")
        self.refine_jobs = Gauge("peft_metal_refine_jobs", "Refinement jobs running (at most --max-refine-jobs).")
        self.refine_jobs_refused = Counter(
            "peft_metal_refine_jobs_refused_total", "Refinement jobs refused (429) because --max-refine-jobs were running."
        )
        self.refine_job_seconds = Histogram(
            "peft_metal_refine_job_duration_seconds", "Refinement job time, start to end, by outcome.", JOB_BUCKETS,
            ("outcome",),
        )
        self.refine_step_seconds = Histogram(
            "peft_metal_refine_step_duration_seconds", "Model time per refinement step.", LATENCY_BUCKETS
        )

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests.inc(route, method, str(status))
            self.latency.observe(seconds, route, method)

    def batch(self, kind: str, size: int, seconds: float, new_tokens: int = 0) -> None:
        with self._lock:
            self.batch_size.observe(size, kind)
            self.batch_seconds.observe(seconds, kind)
            self.rows.inc(kind, amount=size)
            if size > self.batch_size_max.get():
                self.batch_size_max.set(size)
            if new_tokens:
                self.tokens.inc(amount=new_tokens)

    def observe(self, histogram: Histogram, value: float, *labels: str) -> None:
        with self._lock:
            histogram.observe(value, *labels)

    def inc(self, counter: Counter, *labels: str) -> None:
        with self._lock:
            counter.inc(*labels)

    def render(self) -> str:
        metrics = (
            self.requests, self.latency, self.store, self.context_cache, self.batch_size, self.batch_size_max,
            self.batch_seconds, self.rows, self.tokens, self.queue_depth, self.cached_contexts, self.refine_jobs,
            self.refine_jobs_refused, self.refine_job_seconds, self.refine_step_seconds,
        )
        with self._lock:
            return "\n".join(line for metric in metrics for line in metric.render()) + "\n"
