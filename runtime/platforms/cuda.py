"""NVIDIA CUDA platform: CUDA graphs, Triton kernels, NCCL."""
from __future__ import annotations

import contextlib
import importlib.util
import unittest.mock
from typing import Any, Iterator

import torch

from runtime.platforms.base import MemoryInfo, Platform


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    # Triton is optional at install time; without it the torch reference kernels serve.
    attention_backend = "triton" if importlib.util.find_spec("triton") else "torch"
    op_kernels = "triton" if importlib.util.find_spec("triton") else "torch"
    default_compile_backend = "inductor"
    # Graphs are most of decode speed on a device (docs/perf.md): compiled pieces, full graphs for decode.
    default_compile_mode = "compile"
    default_graph_mode = "full_and_piecewise"
    dist_backend = "nccl"
    supports_static_graphs = True
    supports_memory_profiling = True
    pins_host_memory = True

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def auto_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        if checkpoint_dtype in (torch.float16, torch.bfloat16):
            return checkpoint_dtype
        return torch.bfloat16

    def new_graph(self) -> torch.cuda.CUDAGraph:
        return torch.cuda.CUDAGraph()

    def graph_pool_handle(self) -> Any:
        return torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def graph_capture(self, graph: torch.cuda.CUDAGraph, pool: Any, stream: Any = None) -> Iterator[None]:
        # torch.cuda.graph() runs gc.collect() and empty_cache() at every capture; with hundreds of
        # piecewise captures that is most of the capture time, and the pool makes it unnecessary.
        caller_stream = torch.cuda.current_stream()
        try:
            with unittest.mock.patch("gc.collect", lambda *a, **k: 0), \
                    unittest.mock.patch("torch.cuda.empty_cache", lambda: None), \
                    torch.cuda.graph(graph, pool=pool, stream=stream):
                yield
        except Exception:
            _recover_from_failed_capture(caller_stream, pool)
            raise

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated()

    def memory_reserved(self) -> int:
        # The allocator's raw counters: torch.cuda.memory_reserved() flattens every statistic into a dict first
        # (0.3 ms, read twice per captured graph: ~0.2 s of an H100 start-up).
        return torch._C._cuda_memoryStats(torch.cuda.current_device())["reserved_bytes"]["all"]["current"]

    def multiprocessor_count(self, device: torch.device) -> int | None:
        if device.type != "cuda":
            return None
        return torch.cuda.get_device_properties(device).multi_processor_count

    def profiler_kernel_activity(self) -> tuple[Any, Any]:
        from torch.profiler import ProfilerActivity

        return ProfilerActivity.CUDA, torch.autograd.DeviceType.CUDA

    collective_kernel_marker = "nccl"  # ncclDevKernel_AllReduce_..., ncclKernel_AllGather_...
    supports_streams = True

    visible_devices_env = "CUDA_VISIBLE_DEVICES"

    def has_grouped_gemm(self, dtype: torch.dtype) -> bool:
        # torch's grouped GEMM runs CUTLASS kernels for bf16 on Hopper (sm90) and later.
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability() >= (9, 0)

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream()

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream()

    def stream_context(self, stream: Any) -> Any:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    @property
    def async_scheduling_default(self) -> bool:
        return True

    def simulated_collective(self, microseconds: float) -> "_StreamWait":
        # One communication stream per process, as NCCL runs a communicator's collectives on one stream:
        # the two DBO micro-batches' collectives queue on it as real ones would.
        if self._comm_stream is None:
            self._comm_stream, self._sleep_cycles_per_us = torch.cuda.Stream(), _sleep_cycles_per_us()
        caller = torch.cuda.current_stream()
        self._comm_stream.wait_stream(caller)
        with torch.cuda.stream(self._comm_stream):
            torch.cuda._sleep(max(1, int(microseconds * self._sleep_cycles_per_us)))
        done = torch.cuda.Event()
        done.record(self._comm_stream)
        return _StreamWait(done)

    _comm_stream: torch.cuda.Stream | None = None
    _sleep_cycles_per_us: float = 0.0

    @contextlib.contextmanager
    def forbid_host_syncs(self) -> Iterator[None]:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def device_name(self) -> str:
        return torch.cuda.get_device_name()

    def memory_info(self) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info()
        return MemoryInfo(free_bytes=free, total_bytes=total)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int:
        return torch.cuda.max_memory_allocated()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)


def _recover_from_failed_capture(caller_stream: torch.cuda.Stream, pool: Any) -> None:
    """Leave the device as a failed capture found it. When an op invalidates a capture, ending it raises
    inside torch.cuda.graph's exit (torch 2.11), which skips the rest of the capture's ending: the caching
    allocator keeps routing the stream's allocations to the graph's pool ("beginAllocateToPool: already
    recording" at the next capture), the RNG generators stay in capture mode (every later random op
    fails with "Offset increment outside graph capture") and the capture stream stays current. Undo the
    first two, restore the stream; a capture that succeeds then runs the generators' epilogue."""
    device = caller_stream.device.index
    if pool is not None:
        try:
            torch._C._cuda_endAllocateToPool(device, pool)
        except RuntimeError:  # the failed capture got as far as ending it
            pass
    torch.cuda.set_stream(caller_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.zeros(1, device=caller_stream.device).add_(1)
    del graph


class _StreamWait:
    """A simulated collective's handle: ``wait()`` makes the current stream wait for it, as a NCCL work
    handle does (the host does not block)."""

    def __init__(self, done: torch.cuda.Event) -> None:
        self.done = done

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.done)


def _sleep_cycles_per_us() -> float:
    """``torch.cuda._sleep`` spins for a number of clock cycles: how many make a microsecond on this device,
    measured once (outside any capture: the first simulated collective runs in an eager warm-up)."""
    cycles = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles // 10)  # the clock ramps up first
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) * 1000.0)
