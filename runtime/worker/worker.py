"""One rank's worker: the model (its shard under tensor parallelism), its runner, KV cache and samplers.

Every rank runs the same ``Worker``: in the engine's process when there is one rank
(runtime/engine/executor.py), in a process of its own per rank otherwise
(runtime/worker/worker_process.py). Its calls are the executor's whole vocabulary: ``plan_kv_blocks``
(how many KV blocks fit), ``initialize`` (warm-up, KV cache, graphs), ``execute`` (one step), plus
the introspection benchmarks and tests use. Every rank samples (the collectives need every rank in
the forward); the executor keeps rank 0's tokens.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from compiler import counters
from compiler.decorators import compile_timings
from models.default import default_model_path
from models.loader import LoadedModel, load_model
from runtime.attention.kv_tensors import gather_kv, scatter_kv
from runtime.contracts.config import EngineConfig
from runtime.contracts.runner_output import StepResult
from runtime.contracts.scheduler_output import SchedulerOutput
from runtime.distributed.parallel_state import ParallelContext, init_data_parallel, init_distributed
from runtime.platforms import current_platform
from runtime.profiling import KernelProfiler, StepProfile
from runtime.tracing import TraceProfiler
from runtime.worker.kv_sizing import plan_kv_blocks
from runtime.worker.model_runner import ModelRunner
from runtime.worker.multimodal import attach_multimodal
from runtime.worker.sampler import make_generator
from runtime.worker.step_output import PendingStep

logger = logging.getLogger(__name__)

@dataclass
class WorkerSpec:
    """What a rank needs to build its worker (pickled to each worker process)."""
    config: EngineConfig
    max_model_len: int
    model_config: Any  # the checkpoint's config, read once by the engine
    rank: int = 0
    world_size: int = 1
    init_method: str | None = None  # tcp://host:port of the process group's rendezvous (world_size > 1)
    log_level: int = logging.INFO


class Worker:
    def __init__(self, spec: WorkerSpec, loaded: LoadedModel | None = None) -> None:
        """``loaded`` reuses a model already in memory (one rank only: tests, benchmarks)."""
        config = self.config = spec.config
        self.rank = spec.rank
        current_platform.configure_process()
        parallel = None
        if spec.world_size > 1:
            parallel = init_distributed(spec.rank, spec.world_size, spec.init_method, config.enable_expert_parallel,
                                        expert_comm=config.expert_parallel_comm)
        elif config.experts_over_data_parallel:
            parallel = init_data_parallel(config.data_parallel_rank, config.data_parallel_size,
                                          config.data_parallel_master)
        elif config.simulate_collective_us:
            parallel = ParallelContext(simulate_collective_us=config.simulate_collective_us)
        current_platform.manual_seed(config.seed)
        self.startup_s: dict[str, float] = {}  # seconds per start-up phase (startup_report)
        if loaded is None:
            start = time.perf_counter()
            device = config.device if spec.world_size == 1 else current_platform.device(spec.rank)
            loaded = load_model(config.model or default_model_path(), config.dtype, device, config.compilation_config,
                                parallel=parallel, model_config=spec.model_config,
                                model_options=config.model_options())
            self.startup_s["load_s"] = time.perf_counter() - start
        self.runner = ModelRunner(
            loaded.model, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=spec.max_model_len, block_size=config.block_size, dtype=loaded.dtype,
            device=loaded.device, vocab_size=loaded.config.vocab_size,
            compilation_config=config.compilation_config, dbo=config.dbo_thresholds(),
            collectives=config.communicates)
        attach_multimodal(self.runner, loaded, config)
        self.generators: dict[str, torch.Generator] = {}  # per-request generators of seeded requests
        self.profiler: KernelProfiler | None = None  # between profile_start and profile_stop
        self.forward_times: list[float] | None = None  # between forward_timing_start and _stop
        self.tracer = TraceProfiler()

    # ---- start-up ----------------------------------------------------------------------------
    def plan_kv_blocks(self) -> int:
        """KV cache blocks this rank can hold (the executor takes the minimum over ranks). Piecewise graphs
        are captured first: they need no KV cache, and their pool is then measured instead of estimated."""
        with self._phase("warmup_s"):
            self.runner.warmup()  # compiles (one trace) before anything is measured or captured
        with self._phase("capture_s"):
            self.runner.capture_graphs(("piecewise",))
        with self._phase("memory_profile_s"):
            return plan_kv_blocks(self.config, self.runner)

    def initialize(self, num_blocks: int) -> None:
        with self._phase("kv_allocate_s"):
            self.runner.allocate_kv_cache(num_blocks)
        with self._phase("capture_full_s"):
            self.runner.capture_graphs(("full",))  # full graphs bake in the KV cache addresses: allocate first
            self.runner.finish_capture()
        self.startup_s["capture_s"] += self.startup_s.pop("capture_full_s")

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.startup_s[name] = time.perf_counter() - start

    def startup_report(self) -> dict[str, float | int]:
        """Where this rank's start-up went: seconds per phase (the model's compilation happens inside its first
        forward, the warm-up's), what was captured, and the compile cache's hits and misses."""
        return {**self.startup_s, **compile_timings(self.runner.model), "graphs": counters.graphs_captured,
                "graph_pool_mib": self.runner.graphs.pool_bytes() / 2**20,
                "graph_pool_estimate_mib": (estimate / 2**20 if (estimate := self.runner.graphs.estimated_pool_bytes)
                                            is not None else None),
                "cache_hits": counters.cache_hits, "cache_misses": counters.cache_misses}

    # ---- stepping ----------------------------------------------------------------------------
    def launch(self, output: SchedulerOutput) -> PendingStep:
        """Start a step on the device; its results are on their way to the host (``result()`` waits)."""
        for request_id in output.finished_ids:
            self.generators.pop(request_id, None)
        for item in output.scheduled:
            req = item.request
            if req.seed is not None and req.request_id not in self.generators:
                self.generators[req.request_id] = make_generator(req.seed, self.runner.device)
        replays, fallbacks = counters.graph_replays, counters.eager_fallbacks
        pending = self.runner.execute(output, self.generators)
        pending.graph_replays = counters.graph_replays - replays
        pending.eager_steps = counters.eager_fallbacks - fallbacks
        return pending

    def execute(self, output: SchedulerOutput) -> StepResult:
        """One step, waited for."""
        return self.launch(output).result()

    def read_kv(self, block_ids: list[int], num_tokens: int) -> dict[str, torch.Tensor]:
        """This rank's KV of a request's first ``num_tokens`` tokens, on the host (a KV producer sends it)."""
        return gather_kv(self.runner.kv_caches, block_ids, num_tokens)

    def write_kv(self, block_ids: list[int], ranks: list[dict[str, torch.Tensor]]) -> None:
        """Write this rank's part of a prompt's KV (``ranks[rank]``, from a producer) into ``block_ids``."""
        scatter_kv(self.runner.kv_caches, block_ids, ranks[self.rank])

    def dummy_step(self) -> None:
        """A one-token forward writing no KV (a data-parallel rank with no work keeps its peers' collectives)."""
        self.runner.dummy_run(1)

    def set_dbo(self, enabled: bool) -> None:
        self.runner.set_dbo(enabled)

    # ---- introspection (benchmarks, tests) ---------------------------------------------------
    def dbo_stats(self) -> tuple[int, list[Any]]:
        """DBO steps run so far and the yield points of the last one, in order."""
        return self.runner.dbo_steps, list(self.runner.last_dbo_trace)

    def runner_info(self, names: list[str]) -> dict[str, Any]:
        """Values of (dotted) runner attributes, methods called, plus the compiler counters."""
        info: dict[str, Any] = {"counters": copy.deepcopy(vars(counters))}
        for name in names:
            value: Any = self.runner
            for part in name.split("."):
                value = getattr(value, part)
            info[name] = value() if callable(value) else value
        return info

    def profile_start(self) -> bool:
        """Start counting device kernels (False where the platform's kernels are invisible)."""
        self.profiler = KernelProfiler()
        return self.profiler.start()

    def profile_stop(self, steps: int) -> StepProfile | None:
        """The kernels of the steps since ``profile_start`` (runtime/profiling.py)."""
        profiler, self.profiler = self.profiler, None
        return profiler.stop(steps) if profiler is not None else None

    def trace_start(self, directory: str) -> None:
        """Record a torch profiler trace of everything this rank runs until ``trace_stop``."""
        self.tracer.start(directory, self.rank)

    def trace_stop(self) -> str:
        """The trace file written."""
        return self.tracer.stop()

    def forward_timing_start(self) -> None:
        """Time each step's model forward alone (graph replay or eager; both micro-batches under
        DBO), synchronised: where a step's time goes."""
        original = self.runner.forward_step
        self.forward_times = times = []

        def timed(*args: Any, **kwargs: Any) -> Any:
            current_platform.synchronize()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            current_platform.synchronize()
            times.append(time.perf_counter() - start)
            return out

        self.runner.forward_step = timed

    def forward_timing_stop(self) -> list[float]:
        """The forward times (seconds) since ``forward_timing_start``."""
        del self.runner.forward_step  # the instance attribute shadowed the method
        times, self.forward_times = self.forward_times or [], None
        return times
