"""Where a decode step's host time goes (``runtime.bench latency --host-breakdown``).

The launching thread's time in each phase of ``EngineCore.step``, read by timing the engine's calls over a
run of steps of its own (the timers cost about a microsecond a call, kept out of the timed steps): scheduling,
the launch (inputs and forward launch, lm_head, sampling), taking the results in, and the wait for the
device. Runner phases exist where the model runs in this process (no tensor-parallel workers).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from runtime.engine.core import EngineCore

# (label, attribute path from the EngineCore to the object, method); an indented label is part of the one above.
PHASES = (
    ("schedule", "scheduler", "schedule"),
    ("launch", "executor", "launch"),
    ("  inputs+forward", "executor.worker.runner", "forward_step"),
    ("  lm_head", "executor.worker.runner.model", "compute_logits"),
    ("  sample", "executor.worker.runner.sampler", "forward"),
    ("take in", "scheduler", "update_from_output"),
)


@dataclass
class HostPhases:
    steps: int
    step_us: float  # per step, wall
    wait_us: float  # per step, blocked on the device's results
    phases_us: dict[str, float]  # per step, by label (PHASES order; absent where the object is not here)

    @property
    def other_us(self) -> float:
        """The rest of the step: the engine's own bookkeeping around the timed calls."""
        top = sum(us for label, us in self.phases_us.items() if not label.startswith(" "))
        return self.step_us - self.wait_us - top

    def summary(self) -> str:
        parts = [f"{label.strip()} {us:.0f}" if not label.startswith(" ") else f"({label.strip()} {us:.0f})"
                 for label, us in self.phases_us.items()]
        return (f"{self.steps} steps: host per step (us): " + ", ".join(parts)
                + f", other {self.other_us:.0f}; waited {self.wait_us:.0f} of a {self.step_us:.0f} us step")


def _resolve(root: Any, path: str) -> Any | None:
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


@contextlib.contextmanager
def _timed_calls(core: EngineCore, totals: dict[str, float]) -> Iterator[None]:
    """Each PHASES method of ``core``'s objects timed into ``totals`` inside the block (instance attributes
    shadowing the class's methods, removed on the way out)."""
    patched: list[tuple[Any, str]] = []

    def timer(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start
        return timed

    try:
        for label, path, method in PHASES:
            obj = _resolve(core, path)
            if obj is not None and callable(getattr(obj, method, None)):
                setattr(obj, method, timer(label, getattr(obj, method)))
                patched.append((obj, method))
        yield
    finally:
        for obj, method in patched:
            delattr(obj, method)


def host_phases(core: EngineCore, steps: int) -> HostPhases:
    """Run ``steps`` engine steps with the phase timers on; their mean per step."""
    totals: dict[str, float] = collections.defaultdict(float)
    waited, start = core.device_wait_s, time.perf_counter()
    with _timed_calls(core, totals):
        for _ in range(steps):
            core.step()
    elapsed, wait = time.perf_counter() - start, core.device_wait_s - waited
    n = max(steps, 1)
    phases = {label: 1e6 * totals[label] / n for label, _, _ in PHASES if label in totals}
    return HostPhases(steps, 1e6 * elapsed / n, 1e6 * wait / n, phases)
