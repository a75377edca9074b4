"""One tensor-parallel rank: a process holding a shard of the model and its own model runner.

The worker answers the engine's calls over its pipe, one at a time: ``plan`` (KV blocks this rank
can hold), ``initialize`` (warm-up, KV cache, graphs), ``execute`` (one step, from a
``StepMessage``) and ``shutdown``. Every rank runs the same forward (the collectives need all of
them) and samples; only rank 0's tokens go back. A failure is sent back as an error message and
ends the process; the engine never has to guess.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import traceback
from dataclasses import dataclass
from multiprocessing import parent_process
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    config: Any  # EngineConfig
    max_model_len: int
    rank: int
    world_size: int
    init_method: str  # tcp://host:port of the process group's rendezvous
    log_level: int


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


class _Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        from models.default import default_model_path
        from models.loader import load_model
        from runtime.distributed.parallel_state import init_distributed
        from runtime.distributed.step_sync import StepDecoder
        from runtime.engine import make_runner
        from runtime.platforms import current_platform

        config = spec.config
        current_platform.configure_process()
        self.parallel = init_distributed(spec.rank, spec.world_size, spec.init_method, config.enable_expert_parallel)
        current_platform.manual_seed(config.seed)
        loaded = load_model(config.model or default_model_path(), config.dtype, current_platform.device(spec.rank),
                            config.compilation_config, parallel=self.parallel)
        self.config, self.rank = config, spec.rank
        self.runner = make_runner(config, loaded, spec.max_model_len)
        self.decoder = StepDecoder()
        self.generators: dict[str, torch.Generator] = {}
        self.profiler: Any = None  # a KernelProfiler between profile_start and profile_stop

    def plan(self) -> int:
        from runtime.engine import plan_kv_blocks

        return plan_kv_blocks(self.config, self.runner)

    def initialize(self, num_blocks: int) -> None:
        from runtime.engine import prepare_runner

        prepare_runner(self.runner, num_blocks)

    def runner_info(self, names: list[str]) -> dict[str, Any]:
        """Values of (dotted) runner attributes, methods called, plus the compiler counters: what
        benchmarks and tests read from the runner of a single-process engine."""
        from compiler import counters

        info: dict[str, Any] = {"counters": copy.deepcopy(vars(counters))}
        for name in names:
            value: Any = self.runner
            for part in name.split("."):
                value = getattr(value, part)
            info[name] = value() if callable(value) else value
        return info

    def execute(self, message: Any) -> Any:
        from runtime.sampler import make_generator

        output, seeds = self.decoder.decode(message)
        for rid in output.finished_ids:
            self.generators.pop(rid, None)
        for rid, seed in seeds.items():
            self.generators[rid] = make_generator(seed, self.runner.device)
        result = self.runner.execute(output, self.generators)
        return result if self.rank == 0 else None

    def profile_start(self) -> bool:
        """Start counting device kernels (False where the platform's kernels are invisible)."""
        from runtime.profiling import KernelProfiler

        self.profiler = KernelProfiler()
        return self.profiler.start()

    def profile_stop(self, steps: int) -> Any:
        """StepProfile of the steps since ``profile_start`` (runtime/profiling.py)."""
        profiler, self.profiler = self.profiler, None
        return profiler.stop(steps) if profiler is not None else None

    def set_dbo(self, enabled: bool) -> None:
        self.runner.set_dbo(enabled)

    def dbo_stats(self) -> tuple[int, list[Any]]:
        """DBO steps run so far and the yield points of the last one, in order (tests, benchmarks)."""
        return self.runner.dbo_steps, list(self.runner.last_dbo_trace)


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point (spawned by ``MultiprocExecutor``)."""
    logging.basicConfig(level=spec.log_level, format=f"%(levelname)s rank{spec.rank} %(name)s: %(message)s")
    _exit_with_parent()
    worker = None
    try:
        worker = _Worker(spec)
        conn.send(("ok", None))
        while True:
            try:
                method, args = conn.recv()
            except EOFError:  # the engine closed its end: nothing more to do
                return
            if method == "shutdown":
                conn.send(("ok", None))
                return
            conn.send(("ok", getattr(worker, method)(*args)))
    except BaseException as e:  # noqa: BLE001  (everything goes back to the engine, then we exit)
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        logger.error("rank %d failed:\n%s", spec.rank, traceback.format_exc())
        try:
            conn.send(("error", detail))
        except (OSError, EOFError):
            pass
        os._exit(1)
    finally:
        from runtime.distributed.parallel_state import destroy_distributed

        if worker is not None:
            destroy_distributed()
