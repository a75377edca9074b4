"""The multiprocess executor: one worker process per tensor-parallel rank, driven over pipes.

Every rank, rank 0 included, is a worker process; the engine process runs the scheduler only.
That keeps the engine out of the collectives, so it can always notice a failure: it waits on the
workers' pipes together with their process sentinels, so a rank that dies (killed, crashed,
out of memory) or reports an error turns into a ``WorkerError`` within one poll, and a rank that
hangs (a peer stuck inside NCCL) into one after the step timeout. Then every worker is stopped
and the engine refuses further calls. Steps cost one pickled ``StepMessage`` per rank out (a delta,
runtime/worker/step_sync.py) and one small result back.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

from runtime.contracts.runner_output import StepResult
from runtime.contracts.scheduler_output import SchedulerOutput
from runtime.engine.executor import Executor, WorkerError
from runtime.engine.processes import free_port, join_or_kill
from runtime.platforms import current_platform
from runtime.worker.step_sync import StepEncoder
from runtime.worker.worker import WorkerSpec
from runtime.worker.worker_process import worker_main

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 1800.0  # load + compile + capture on the slowest rank
STEP_TIMEOUT_S = 600.0  # a step may compile a new size (inductor's first compile is slow)
_STOP_GRACE_S = 5.0
_DEATH_GRACE_S = 0.5  # how long a peer's failure report waits for news of a dead rank


def _stop(procs: list[mp.Process], conns: list[Connection]) -> None:
    """Ask politely, then terminate, then kill (a rank stuck in a collective ignores the pipe)."""
    for conn in conns:
        try:
            conn.send(("shutdown", ()))
        except (OSError, ValueError):
            pass
    join_or_kill(procs, _STOP_GRACE_S)
    for conn in conns:
        conn.close()


class MultiprocExecutor(Executor):
    def __init__(self, spec: WorkerSpec) -> None:
        """``spec``: what every rank shares; each worker gets a copy with its own rank."""
        world = spec.config.tensor_parallel_size
        ctx = mp.get_context(current_platform.worker_start_method)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.world_size = world
        self._conns: list[Connection] = []
        self._procs: list[mp.Process] = []
        self._error: WorkerError | None = None
        self._encoder = StepEncoder()
        level = logging.getLogger().getEffectiveLevel()
        for rank in range(world):
            ours, theirs = ctx.Pipe(duplex=True)
            rank_spec = dataclasses.replace(spec, rank=rank, world_size=world, init_method=init_method, log_level=level)
            proc = ctx.Process(target=worker_main, args=(rank_spec, theirs), name=f"graphmode-tp{rank}", daemon=True)
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns)
        logger.info("started %d tensor-parallel workers (pids %s)", world, [p.pid for p in self._procs])
        self._gather(STARTUP_TIMEOUT_S, "start-up")
        plans = self._call("plan_kv_blocks", (), STARTUP_TIMEOUT_S)
        # Ranks may hold different KV head counts (uneven head shards) and different free memory:
        # every rank must fit the same number of blocks, so the smallest plan wins.
        self.num_kv_blocks = min(plans)
        logger.info("KV blocks per rank: %s -> %d", plans, self.num_kv_blocks)
        self._call("initialize", (self.num_kv_blocks,), STARTUP_TIMEOUT_S)

    # ---- calls -----------------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def execute(self, output: SchedulerOutput) -> StepResult:
        return self._call("execute", (self._encoder.encode(output),), STEP_TIMEOUT_S)[0]

    def call_workers(self, method: str, *args: Any) -> list[Any]:
        return self._call(method, args, STEP_TIMEOUT_S)

    def shutdown(self) -> None:
        self._finalizer()

    # ---- plumbing --------------------------------------------------------------------------
    def _call(self, method: str, args: tuple, timeout: float) -> list[Any]:
        if self._error is not None:
            raise self._error
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive():
                self._fail(f"tensor-parallel worker rank {rank} (pid {proc.pid}) has died (exit code "
                           f"{proc.exitcode}) before {method!r}")
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((method, args))
            except (OSError, ValueError) as e:
                self._fail(f"cannot reach tensor-parallel worker rank {rank}: {e}")
        return self._gather(timeout, method)

    def _gather(self, timeout: float, what: str) -> list[Any]:
        """Every rank's answer, watching the processes while waiting."""
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in replies]
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"tensor-parallel worker rank(s) {pending} did not answer {what!r} within {timeout:.0f} s")
            waitables = {self._conns[r]: r for r in pending}
            waitables.update({self._procs[r].sentinel: r for r in pending})
            for ready in wait(list(waitables), timeout=left):
                rank = waitables[ready]
                if rank in replies:
                    continue
                if ready is self._conns[rank] or self._conns[rank].poll():
                    replies[rank] = self._receive(rank, what)
                else:
                    self._procs[rank].join(0.5)
                    self._fail(f"tensor-parallel worker rank {rank} (pid {self._procs[rank].pid}) died during "
                               f"{what!r} with exit code {self._procs[rank].exitcode}")
        return [replies[r] for r in range(self.world_size)]

    def _receive(self, rank: int, what: str) -> Any:
        try:
            status, value = self._conns[rank].recv()
        except (EOFError, OSError):
            self._procs[rank].join(0.5)
            self._fail(f"tensor-parallel worker rank {rank} (pid {self._procs[rank].pid}) died during {what!r} "
                       f"with exit code {self._procs[rank].exitcode}")
        if status == "error":
            # A rank that died makes its peers' collectives fail: name the dead one as the cause.
            wait([p.sentinel for r, p in enumerate(self._procs) if r != rank], timeout=_DEATH_GRACE_S)
            dead = [(r, p) for r, p in enumerate(self._procs) if r != rank and p.exitcode not in (None, 0, 1)]
            if dead:
                r, p = dead[0]
                self._fail(f"tensor-parallel worker rank {r} (pid {p.pid}) died during {what!r} with exit code "
                           f"{p.exitcode} (rank {rank} then failed: {value})")
            self._fail(f"tensor-parallel worker rank {rank} failed during {what!r}: {value}")
        return value

    def _fail(self, message: str) -> None:
        logger.error("%s; stopping all workers", message)
        self._error = WorkerError(message)
        for proc in self._procs:  # the others may be blocked in a collective with the failed rank
            if proc.is_alive():
                proc.terminate()
        self._finalizer()
        raise self._error
