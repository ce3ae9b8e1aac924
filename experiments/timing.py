"""Device timing with barriers: warm-up first, then the median of repeated timed calls."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def median_ms(fn: Callable[[], object], sync: Callable[[object], None] = jax.block_until_ready,
              reps: int = 20, warmup: int = 3) -> float:
    """Median wall time of `fn()` in ms, each call followed by `sync` on its result."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
