"""The one timer the micro-benchmarks share: median wall time of repeated calls after one untimed warm-up call."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_seconds(function: Callable[[], Any], repeats: int) -> float:
    function()  # warm-up: first calls pay one-off costs (weight reorders, allocations)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)
