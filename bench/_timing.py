"""Shared timing helper for the benchmark scripts: best-of-k medians, interleaved candidates."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 15) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` calls (the median resists the
    other process noise of a shared 2-core machine better than the mean)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
