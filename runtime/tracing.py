"""Torch profiler traces of what a rank runs between a start and a stop: host ops and, where the
platform exposes them, device kernels. Written as Chrome trace JSON, which Perfetto
(ui.perfetto.dev) and chrome://tracing open.

Driven by the server's ``/start_profile`` and ``/stop_profile`` (``--profiler-dir``) and by
``runtime.bench ... --profile DIR``; every rank traces itself into one file of its own.
"""
from __future__ import annotations

import logging
import os
import time

from runtime.platforms import current_platform

logger = logging.getLogger(__name__)


class ProfilerStateError(RuntimeError):
    """A stop without a start, or a second start."""


class TraceProfiler:
    def __init__(self) -> None:
        self._prof = None
        self._path: str | None = None

    @property
    def running(self) -> bool:
        return self._prof is not None

    def start(self, directory: str, rank: int = 0) -> None:
        from torch.profiler import ProfilerActivity, profile

        if self._prof is not None:
            raise ProfilerStateError("the profiler is already running: stop it first")
        os.makedirs(directory, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        device_kernels = current_platform.profiler_kernel_activity()
        if device_kernels is not None:
            activities.append(device_kernels[0])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self._path = os.path.join(directory, f"graphmode-rank{rank}-{stamp}-{os.getpid()}.trace.json")
        self._prof = profile(activities=activities, record_shapes=True)
        self._prof.__enter__()
        logger.info("profiler started: the trace goes to %s", self._path)

    def stop(self) -> str:
        """Ends the trace and writes it; returns its path."""
        if self._prof is None:
            raise ProfilerStateError("the profiler is not running: start it first")
        current_platform.synchronize()
        prof, path, self._prof, self._path = self._prof, self._path, None, None
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(path)
        logger.info("profiler stopped: trace written to %s", path)
        return path
