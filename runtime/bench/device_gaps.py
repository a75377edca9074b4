"""Where a traced run left the device idle, read from a torch profiler trace (Chrome JSON).

Every device activity (kernel, copy, fill) carries the correlation id of the host call that launched
it; the kernels of one CUDA graph replay share the id of its ``cudaGraphLaunch``. A gap between two
activities of the same launch is the graph's own (a kernel boundary); a gap between activities of two
launches is time the device waited for the host: what async scheduling and a lean launch path remove.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

_DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})


@dataclass
class DeviceGaps:
    steps: int
    busy_us: float  # per step: device activity (overlaps counted once)
    idle_between_launches_us: float  # per step: waiting for the next launch (host-bound time)
    idle_inside_graphs_us: float  # per step: kernel boundaries inside one graph replay
    largest_gap_us: float  # the longest single wait between two launches

    def summary(self) -> str:
        return (f"{self.steps} steps: device busy {self.busy_us:.1f} us/step, idle between launches "
                f"{self.idle_between_launches_us:.1f} us/step (largest {self.largest_gap_us:.1f} us), "
                f"inside graphs {self.idle_inside_graphs_us:.1f} us/step")


def device_gaps(trace_path: str, steps: int) -> DeviceGaps | None:
    """The trace's device idle time per step (``steps`` engine steps were traced); None when the trace
    holds no device activity (a platform whose kernels the profiler cannot see)."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("args", {}).get("correlation"))
                   for e in events if e.get("cat") in _DEVICE_CATEGORIES and e.get("ph") == "X")
    if not spans:
        return None
    busy = between = inside = largest = 0.0
    end, last_launch = spans[0][0], None
    for start, stop, launch in spans:
        gap = start - end
        if gap > 0:
            if launch is not None and launch == last_launch:
                inside += gap
            else:
                between += gap
                largest = max(largest, gap)
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end = stop
        last_launch = launch
    n = max(steps, 1)
    return DeviceGaps(steps, busy / n, between / n, inside / n, largest)
