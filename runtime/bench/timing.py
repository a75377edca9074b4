"""Wall-clock timing of a device call: what the op-level benchmarks (mm-encoder, moe) share."""
from __future__ import annotations

import time
from typing import Any, Callable

from runtime.platforms import current_platform


def time_calls(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` over ``iters`` calls after ``warmup`` untimed ones, the device synchronized
    around each, so a sample holds the call's device work as well as its launch."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        current_platform.synchronize()
        start = time.perf_counter()
        fn()
        current_platform.synchronize()
        samples.append(time.perf_counter() - start)
    return samples
