"""The process around one rank's ``Worker`` under tensor parallelism, answering the engine over a pipe.

Calls come one at a time as ``(method, args)``; ``execute`` arrives as a ``StepMessage`` (a delta,
runtime/worker/step_sync.py) and is rebuilt into the step's ``SchedulerOutput`` here, so the
``Worker`` sees the same call in every process. A failure goes back as an error message and ends
the process: the engine never has to guess.
"""
from __future__ import annotations

import logging
import os
import threading
import traceback
from multiprocessing import parent_process
from multiprocessing.connection import Connection, wait
from typing import Any

from runtime.distributed.parallel_state import destroy_distributed
from runtime.logger import set_level as set_log_level
from runtime.worker.step_sync import StepDecoder
from runtime.worker.worker import Worker, WorkerSpec

logger = logging.getLogger(__name__)


def _exit_with_parent() -> None:
    """A worker blocked in a collective cannot read its pipe: when the engine process dies, this
    thread ends the worker anyway."""
    parent = parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="graphmode-parent-watch", daemon=True).start()


class _RemoteWorker:
    """The worker as the pipe sees it: steps come in as deltas, only rank 0's results go back."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = Worker(spec)
        self.decoder = StepDecoder()
        self.rank = spec.rank

    def call(self, method: str, args: tuple) -> Any:
        if method == "execute":
            (message,) = args
            result = self.worker.execute(self.decoder.decode(message))
            return result if self.rank == 0 else None
        return getattr(self.worker, method)(*args)


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point (spawned by ``MultiprocExecutor``)."""
    logging.basicConfig(level=spec.log_level, format=f"%(levelname)s rank{spec.rank} %(name)s: %(message)s")
    set_log_level(spec.log_level)  # our loggers carry their own level (runtime/logger.py)
    _exit_with_parent()
    remote = None
    try:
        remote = _RemoteWorker(spec)
        conn.send(("ok", None))
        while True:
            try:
                method, args = conn.recv()
            except EOFError:  # the engine closed its end: nothing more to do
                return
            if method == "shutdown":
                conn.send(("ok", None))
                return
            conn.send(("ok", remote.call(method, args)))
    except BaseException as e:  # noqa: BLE001  (everything goes back to the engine, then we exit)
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        logger.error("rank %d failed:\n%s", spec.rank, traceback.format_exc())
        try:
            conn.send(("error", detail))
        except (OSError, EOFError):
            pass
        os._exit(1)
    finally:
        if remote is not None:
            destroy_distributed()

