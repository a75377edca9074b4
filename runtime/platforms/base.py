"""The platform interface: everything that differs between CPU, CUDA and Ascend lives behind it.

This package is a leaf: it imports nothing else of ours, so every other module may import it.
"""
from __future__ import annotations

import array
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager
import torch


@dataclass(frozen=True)
class MemoryInfo:
    free_bytes: int
    total_bytes: int


class Platform:
    """Base platform; concrete platforms override what their device offers."""

    name: str = "base"
    device_type: str = "cpu"
    # Attention backend name: a generic one of runtime/attention ("torch", "triton") or one this
    # platform provides through extra_attention_backends() (e.g. "npu").
    attention_backend: str = "torch"
    # Generic kernel provider for fused custom ops in runtime/ops ("torch", "triton"); a platform's
    # own kernels (op_kernel) take precedence over it.
    op_kernels: str = "torch"
    default_compile_backend: str = "inductor"
    # What CompilationConfig() means here (its mode and graph_mode left None).
    default_compile_mode: str = "eager"
    default_graph_mode: str = "none"
    dist_backend: str = "gloo"
    # How tensor-parallel worker processes start: "spawn" is the only safe way once a device
    # runtime may be initialised; a platform without one can "fork" (no re-import, warm compiler).
    worker_start_method: str = "spawn"
    supports_static_graphs: bool = False
    # Whether peak device memory of a dummy step can be measured (sizes the KV cache from it).
    supports_memory_profiling: bool = False
    # Whether host memory can be pinned (page-locked): copies between it and the device are then
    # asynchronous to the host, where a copy from pageable memory may wait for the device's queue.
    pins_host_memory: bool = False

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    # ---- static graphs (platforms without them never get these calls) ---------------------
    def new_graph(self) -> Any:
        raise NotImplementedError(f"{self.name} has no static graphs")

    def graph_pool_handle(self) -> Any:
        raise NotImplementedError(f"{self.name} has no static graphs")

    def graph_capture(self, graph: Any, pool: Any, stream: Any = None) -> ContextManager[Any]:
        """Capture into ``graph`` from ``pool`` on ``stream`` (None: the platform's capture stream)."""
        raise NotImplementedError(f"{self.name} has no static graphs")

    def memory_allocated(self) -> int:
        return 0

    def memory_reserved(self) -> int:
        """Device memory this process's caching allocator holds (allocated or cached), in bytes."""
        return 0

    # ---- kernels, attention and compile backends the platform itself provides -------------
    def op_kernel(self, op_name: str) -> Callable[..., Any] | None:
        """The platform's own kernel for custom op ``op_name`` ("graphmode::rms_norm", ...), or None.

        A kernel takes the op's arguments and returns its result, or None to decline a call it
        cannot serve (dtype, shape); the op then runs its generic path (Triton or the torch reference).
        """
        return None

    def has_grouped_gemm(self, dtype: torch.dtype) -> bool:
        """Whether ``torch._grouped_mm`` runs natively here for ``dtype`` (one kernel for every expert's GEMM,
        group sizes read on the device: the MoE experts without a host sync, so they capture in graphs)."""
        return False

    def extra_attention_backends(self) -> dict[str, str]:
        """Attention backend name -> module path (with ``store_kv`` and ``paged_attention``)."""
        return {}

    # Compile backends besides "eager" and "inductor" (e.g. "torchair"), for error messages.
    extra_compile_backends: tuple[str, ...] = ()

    def compile_backend(self, name: str) -> Callable[[torch.fx.GraphModule, list[Any]], Callable] | None:
        """A compile function ``(graph_module, example_inputs) -> callable`` for backend ``name``."""
        return None

    def multiprocessor_count(self, device: torch.device) -> int | None:
        """Compute units of ``device`` (kernels size their grids by it); None where unknown."""
        return None

    def profiler_kernel_activity(self) -> tuple[Any, Any] | None:
        """(torch.profiler.ProfilerActivity, torch.autograd.DeviceType) of device kernels, or None."""
        return None

    # Substring of the profiler names of the communication library's kernels (None: not visible).
    collective_kernel_marker: str | None = None

    # ---- streams, events, devices (CPU has one implicit stream: these are no-ops there) ----
    supports_streams: bool = False

    def device_count(self) -> int:
        return 1

    def set_device(self, index: int) -> None:
        return None

    # The environment variable that says which devices a process sees (None: the host hands out none).
    visible_devices_env: str | None = None

    def data_parallel_placement(self, rank: int, size: int, tensor_parallel_size: int) -> tuple[dict[str, str], int]:
        """Environment for data-parallel engine core ``rank`` of ``size`` (each ``tensor_parallel_size`` devices),
        set before it touches a device, and how many cores share each device. With enough devices each core
        sees its own; with fewer, every core sees them all and they share (each with a fixed KV cache size)."""
        if self.visible_devices_env is None:
            return {}, 1
        visible = os.environ.get(self.visible_devices_env)
        devices = visible.split(",") if visible else [str(i) for i in range(self.device_count())]
        if len(devices) < size * tensor_parallel_size:
            return {}, -(-size * tensor_parallel_size // max(1, len(devices)))
        first = rank * tensor_parallel_size
        return {self.visible_devices_env: ",".join(devices[first: first + tensor_parallel_size])}, 1

    def new_stream(self) -> Any:
        """A new side stream, or None where the device has a single implicit stream."""
        return None

    def current_stream(self) -> Any:
        return None

    def stream_context(self, stream: Any) -> ContextManager[Any]:
        """Make ``stream`` current inside the block (``None`` means: leave the current one)."""
        return contextlib.nullcontext()

    def new_event(self) -> Any:
        return None

    @property
    def async_scheduling_default(self) -> bool:
        """Whether engines schedule the next step while the device runs this one, unless told otherwise:
        worth it where launches are asynchronous (a device with streams); on a CPU the forward runs on
        the launching thread, so there is nothing to overlap."""
        return False

    def simulated_collective(self, microseconds: float) -> Any:
        """Stand-in for a collective that takes ``microseconds``: a handle whose ``wait()`` makes the caller's
        stream wait for it, or None once done. Here (one implicit stream) the host sleeps; a device with
        streams holds its communication stream instead (CUDA: calibrated ``torch.cuda._sleep``)."""
        time.sleep(microseconds / 1e6)
        return None

    def forbid_host_syncs(self) -> ContextManager[Any]:
        """Inside the block, an operation that makes the host wait for the device (``.item()``, ``.tolist()``,
        a copy to pageable memory, a stream synchronize) raises: tests hold the async launch path to that."""
        return contextlib.nullcontext()

    def host_buffer(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host memory a device->host copy can land in without blocking the host (pinned, where it exists)."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.pins_host_memory)

    def to_device(self, values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Host values (a list, nested lists) on the device without the host waiting for the device:
        staged in pinned memory where there is some. From pageable memory the driver may synchronize with
        the stream before it copies, which made every step's input copy wait for the step in flight."""
        return self.pinned(host_tensor(values, dtype)).to(device, non_blocking=True)

    def pinned(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` in pinned memory where there is some, so a non-blocking copy from it never waits."""
        return host.pin_memory() if self.pins_host_memory else host

    def configure_process(self) -> None:
        """One-time, per-process settings (threads and the like) before a model runs."""
        return None

    def device_name(self) -> str:
        return self.name

    def memory_info(self) -> MemoryInfo:
        raise NotImplementedError

    def synchronize(self) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def reset_peak_memory(self) -> None:
        return None

    def peak_memory_bytes(self) -> int:
        return 0

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def auto_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype ``dtype="auto"`` means here: the checkpoint's, when it names a float type."""
        if checkpoint_dtype in (torch.float16, torch.bfloat16, torch.float32):
            return checkpoint_dtype
        return torch.float32


# array.array reads a flat list of numbers at C speed: three times faster than torch.tensor(list) for the
# thousand-odd numbers a step's inputs hold at batch 256.
_ARRAY_TYPECODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f", torch.float64: "d"}


def host_tensor(values: Any, dtype: torch.dtype) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on the host, faster for a flat list of numbers."""
    code = _ARRAY_TYPECODES.get(dtype)
    if code is not None and isinstance(values, list) and values and not isinstance(values[0], (list, tuple)):
        return torch.frombuffer(array.array(code, values), dtype=dtype)
    return torch.tensor(values, dtype=dtype)
