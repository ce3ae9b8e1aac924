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


def pipelined_ms(fn: Callable[[], object], sync: Callable[[object], None] = jax.block_until_ready,
                 calls: int = 20, reps: int = 5, warmup: int = 2) -> float:
    """Device time of one `fn()` in ms: `calls` back-to-back calls (dispatch overlaps the device's
    work), one `sync` at the end, the median over `reps` such rounds divided by `calls`. For kernels
    that run shorter than a host round trip."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn()
        sync(out)
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)
