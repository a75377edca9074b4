"""Device kernels per engine step, and the time spent in collective kernels, from torch's profiler.

Used by ``runtime.bench --count-kernels``: in the engine process for one rank, and inside each
tensor-parallel worker (started and stopped around the same steps) for several.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from runtime.platforms import current_platform


@dataclass
class StepProfile:
    kernels_per_step: float
    # Device time in the communication library's kernels (NCCL all-reduce ...); None where the
    # platform cannot tell them apart.
    collective_ms_per_step: float | None


class KernelProfiler:
    """``start()``; run some steps; ``stop(steps)`` -> StepProfile (None where kernels are invisible)."""

    def __init__(self) -> None:
        self._prof = None
        self._device_type = None

    def start(self) -> bool:
        from torch.profiler import ProfilerActivity, profile

        device_kernels = current_platform.profiler_kernel_activity()
        if device_kernels is None:
            return False
        activity, self._device_type = device_kernels
        # Without acc_events (where torch has it) the profiler drops events at the end of its cycle.
        extra = {"acc_events": True} if "acc_events" in inspect.signature(profile.__init__).parameters else {}
        self._prof = profile(activities=[ProfilerActivity.CPU, activity], **extra)
        self._prof.__enter__()
        return True

    def stop(self, steps: int) -> StepProfile | None:
        if self._prof is None:
            return None
        current_platform.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        kernels = [e for e in prof.events() if e.device_type == self._device_type]
        marker = current_platform.collective_kernel_marker
        collective_ms = None
        if marker is not None:
            collective_us = sum(e.time_range.elapsed_us() for e in kernels if marker in e.name.lower())
            collective_ms = collective_us / 1e3 / steps
        return StepProfile(len(kernels) / steps, collective_ms)
