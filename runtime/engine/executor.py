"""Executors: how the engine reaches its workers. One interface, so ``EngineCore`` has one code path.

``InProcessExecutor`` holds the single rank's ``Worker`` in the engine's process and calls it
directly (nano-vllm's rank-0 ``ModelRunner``); ``MultiprocExecutor``
(runtime/engine/multiproc_executor.py) runs one worker process per rank and talks over pipes.
Either way the engine sees the same calls: start-up (plan the KV cache, initialize), one
``execute`` per step returning rank 0's ``StepResult``, and ``call_workers`` for everything else.
"""
from __future__ import annotations

import abc
import logging
from typing import Any

from models.loader import LoadedModel
from runtime.contracts.runner_output import FinishedStep, StepHandle, StepResult
from runtime.contracts.scheduler_output import SchedulerOutput
from runtime.worker.worker import Worker, WorkerSpec

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker died, failed or stopped answering; the engine cannot go on."""


class Executor(abc.ABC):
    num_kv_blocks: int  # KV blocks every rank holds, fixed at start-up

    @abc.abstractmethod
    def execute(self, output: SchedulerOutput) -> StepResult:
        """One step on every rank; rank 0's result."""

    def launch(self, output: SchedulerOutput) -> StepHandle:
        """Start one step; its handle's ``result()`` waits for it. Executors that cannot overlap the
        host with the device run it here, whole."""
        return FinishedStep(self.execute(output))

    @abc.abstractmethod
    def call_workers(self, method: str, *args: Any) -> list[Any]:
        """Every rank's ``Worker.method(*args)``, by rank (e.g. "set_dbo", "profile_start")."""

    def shutdown(self) -> None:
        """Stop the worker processes, if any (an in-process worker ends with the engine)."""


class InProcessExecutor(Executor):
    """One rank, in this process: calls go straight to the worker, no copies, no pipes."""

    def __init__(self, spec: WorkerSpec, loaded: LoadedModel | None = None) -> None:
        self.worker = Worker(spec, loaded)
        self.num_kv_blocks = self.worker.plan_kv_blocks()
        self.worker.initialize(self.num_kv_blocks)

    def execute(self, output: SchedulerOutput) -> StepResult:
        return self.worker.execute(output)

    def launch(self, output: SchedulerOutput) -> StepHandle:
        return self.worker.launch(output)

    def call_workers(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]
