"""Wall-clock timing of a device call: what the op-level benchmarks (mm-encoder, moe, norm-linear) share."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator

from runtime.ops.kernels import KERNELS_ENV
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


@contextlib.contextmanager
def op_kernel(op_name: str, provider: str | None) -> Iterator[None]:
    """GRAPHMODE_OP_KERNELS extended to ask ``op_name`` for ``provider`` ("torch": its reference path), restored
    afterwards; None leaves the variable as it is (the platform's choice, or the user's)."""
    before = os.environ.get(KERNELS_ENV)
    if provider is not None:
        os.environ[KERNELS_ENV] = ",".join(filter(None, (before, f"{op_name}={provider}")))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(KERNELS_ENV, None)
        else:
            os.environ[KERNELS_ENV] = before


def captured(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once in a static graph (after one call outside the capture: kernel selection,
    workspaces); the callable replays it."""
    fn()
    current_platform.synchronize()
    graph = current_platform.new_graph()
    with current_platform.graph_capture(graph, current_platform.graph_pool_handle()):
        fn()
    return graph.replay
