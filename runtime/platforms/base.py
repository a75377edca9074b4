"""The platform interface: everything that differs between CPU, CUDA and Ascend lives behind it.

This package is a leaf: it imports nothing else of ours, so every other module may import it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager
import torch


@dataclass(frozen=True)
class MemoryInfo:
    free_bytes: int
    total_bytes: int


class Platform:
    """Base platform; concrete platforms override what their device offers."""

    name: str = "base"
    device_type: str = "cpu"
    # Name of the attention backend module in runtime/attention ("torch", "triton", "npu").
    attention_backend: str = "torch"
    # Kernel provider for fused custom ops in runtime/ops ("torch", "triton", "npu").
    op_kernels: str = "torch"
    default_compile_backend: str = "inductor"
    dist_backend: str = "gloo"
    supports_static_graphs: bool = False
    # Whether peak device memory of a dummy step can be measured (sizes the KV cache from it).
    supports_memory_profiling: bool = False

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

    def graph_capture(self, graph: Any, pool: Any) -> ContextManager[Any]:
        raise NotImplementedError(f"{self.name} has no static graphs")

    def memory_allocated(self) -> int:
        return 0

    # ---- streams, events, devices (CPU has one implicit stream: these are no-ops there) ----
    supports_streams: bool = False

    def device_count(self) -> int:
        return 1

    def set_device(self, index: int) -> None:
        return None

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
