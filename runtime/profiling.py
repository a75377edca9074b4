"""Device kernels per engine step, each kernel's share of the step, and the time spent in collective
kernels, from torch's profiler.

Used by ``runtime.bench --count-kernels`` (and ``--kernel-table``): in the engine process for one rank,
and inside each tensor-parallel worker (started and stopped around the same steps) for several.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from runtime.platforms import current_platform


@dataclass(frozen=True)
class KernelStat:
    """One kernel (by name) in a step: launches and device time per step."""
    name: str
    count_per_step: float
    us_per_step: float


@dataclass
class StepProfile:
    kernels_per_step: float
    # Device time in the communication library's kernels (NCCL all-reduce ...); None where the
    # platform cannot tell them apart.
    collective_ms_per_step: float | None
    # Every kernel by name, the costliest first.
    kernels: list[KernelStat] = field(default_factory=list)

    @property
    def device_us_per_step(self) -> float:
        return sum(k.us_per_step for k in self.kernels)


def kernel_stats(events: Iterable[Any], steps: int) -> list[KernelStat]:
    """Device events (``name``, ``time_range.elapsed_us()``) grouped by name, per step, costliest first."""
    count: dict[str, int] = defaultdict(int)
    us: dict[str, float] = defaultdict(float)
    for event in events:
        count[event.name] += 1
        us[event.name] += event.time_range.elapsed_us()
    stats = [KernelStat(name, count[name] / steps, us[name] / steps) for name in count]
    return sorted(stats, key=lambda k: (-k.us_per_step, k.name))


def kernel_table(profile: StepProfile, title: str, name_width: int = 90) -> str:
    """A markdown table of ``profile``'s kernels: name, launches and us per step, share of device time."""
    total = profile.device_us_per_step or 1.0
    lines = [f"### {title}", "",
             f"{profile.kernels_per_step:.0f} kernels, {profile.device_us_per_step:.1f} us of device time per step",
             "", "| kernel | per step | us per step | share |", "| --- | ---: | ---: | ---: |"]
    for k in profile.kernels:
        name = k.name if len(k.name) <= name_width else k.name[:name_width - 3] + "..."
        lines.append(f"| `{name}` | {k.count_per_step:g} | {k.us_per_step:.1f} | {100 * k.us_per_step / total:.1f} % |")
    return "\n".join(lines) + "\n"


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
        return StepProfile(len(kernels) / steps, collective_ms, kernel_stats(kernels, steps))
