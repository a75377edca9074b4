"""Ascend NPU platform through torch_npu: ACL graphs (NPUGraph), HCCL, torch_npu kernels, torchair.

Written against torch_npu 2.11 .. 2.14 (the releases paired with the torch versions we support).
NOT executed on Ascend hardware by this project's CI (no Ascend device is reachable from it); each
torch_npu call names the API version it was written against, and docs/platforms.md lists them all.

This module imports torch_npu, so runtime/platforms/__init__.py imports it only after finding
torch_npu installed: machines without torch_npu never load it.
"""
from __future__ import annotations

import contextlib
import threading
import unittest.mock
from typing import Any, Callable, Iterator

import torch
import torch_npu  # noqa: F401 - registers torch.npu and the "npu" device type

from runtime.platforms.base import MemoryInfo, Platform
from runtime.platforms.npu_kernels import KERNELS

# Compile backends through torchair (torch_npu's torch.compile backend) -> torchair CompilerConfig.mode.
# "max-autotune" lowers to an Ascend IR (GE) graph; "reduce-overhead" makes torchair capture ACL
# graphs itself (use it with graph_mode "none": our own NPUGraph capture would nest inside it).
TORCHAIR_MODES = {"torchair": "max-autotune", "torchair-reduce-overhead": "reduce-overhead"}


class AclGraph:
    """A ``torch.npu.NPUGraph`` plus the host-side task updates to run before each replay.

    Ops whose parameters live on the host (the fused-infer-attention op's sequence lengths) are
    captured inside a graph task group; their updater re-issues them with this step's values
    through torch_npu's graph task update API (see npu_attention.py).
    """

    def __init__(self) -> None:
        # torch.npu.NPUGraph(): torch_npu 2.11 (NPUGraph API since torch_npu 2.1.0.post8 / 6.0.0).
        self.graph = torch.npu.NPUGraph()
        self.task_updaters: dict[str, Callable[[], None]] = {}

    def replay(self) -> None:
        for update in self.task_updaters.values():
            update()
        self.graph.replay()


class NpuPlatform(Platform):
    name = "npu"
    device_type = "npu"
    attention_backend = "npu"
    # No generic (Triton) kernels here: the torch_npu kernels come through op_kernel().
    op_kernels = "torch"
    # Our own pieces captured as ACL graphs by StaticGraphRunner; "torchair" is the other path.
    default_compile_backend = "eager"
    # Graphs are most of decode speed on a device (docs/perf.md): compiled pieces, full graphs for decode.
    default_compile_mode = "compile"
    default_graph_mode = "full_and_piecewise"
    dist_backend = "hccl"
    supports_static_graphs = True
    supports_memory_profiling = True
    pins_host_memory = True
    supports_streams = True
    extra_compile_backends = tuple(TORCHAIR_MODES)

    def __init__(self) -> None:
        # Which AclGraph this thread is capturing (DBO may capture micro-batch graphs in threads).
        self._capture = threading.local()
        self._update_stream: Any = None

    @classmethod
    def is_available(cls) -> bool:
        return torch.npu.is_available()  # torch_npu 2.11

    def auto_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        if checkpoint_dtype in (torch.float16, torch.bfloat16):
            return checkpoint_dtype
        return torch.bfloat16

    # ---- ACL graphs -----------------------------------------------------------------------
    def new_graph(self) -> AclGraph:
        return AclGraph()

    def graph_pool_handle(self) -> Any:
        # torch.npu.graph_pool_handle(): torch_npu 2.11 (same contract as torch.cuda's).
        return torch.npu.graph_pool_handle()

    @contextlib.contextmanager
    def graph_capture(self, graph: AclGraph, pool: Any, stream: Any = None) -> Iterator[None]:
        # torch.npu.graph(npu_graph, pool=...) runs gc.collect() and torch.npu.empty_cache() per
        # capture, like torch.cuda.graph; the shared pool makes both unnecessary (torch_npu 2.11).
        self._capture.graph = graph
        try:
            with unittest.mock.patch("gc.collect", lambda *a, **k: 0), \
                    unittest.mock.patch("torch.npu.empty_cache", lambda: None), \
                    torch.npu.graph(graph.graph, pool=pool, stream=stream):
                yield
        finally:
            self._capture.graph = None

    def capturing_graph(self) -> AclGraph | None:
        """The graph this thread is capturing, or None (attention asks, to capture an updatable task)."""
        return getattr(self._capture, "graph", None)

    def graph_update_stream(self) -> Any:
        """The side stream that graph task updates are issued on (one per process)."""
        if self._update_stream is None:
            self._update_stream = torch.npu.Stream()  # torch_npu 2.11
        return self._update_stream

    def memory_allocated(self) -> int:
        return torch.npu.memory_allocated()  # torch_npu 2.11

    def memory_reserved(self) -> int:
        return torch.npu.memory_reserved()  # torch_npu 2.11

    # ---- kernels, attention, compile backends ---------------------------------------------
    def op_kernel(self, op_name: str) -> Callable[..., Any] | None:
        return KERNELS.get(op_name)

    def extra_attention_backends(self) -> dict[str, str]:
        return {"npu": "runtime.platforms.npu_attention"}

    def compile_backend(self, name: str) -> Callable[[torch.fx.GraphModule, list[Any]], Callable] | None:
        if name not in TORCHAIR_MODES:
            return None
        # torchair ships with torch_npu and must be imported after it. API: torchair.CompilerConfig,
        # config.mode in {"max-autotune", "reduce-overhead"}, torchair.get_npu_backend(compiler_config=)
        # (torch_npu 2.11; reduce-overhead documented as experimental since Ascend Extension 7.0.0).
        import torchair

        config = torchair.CompilerConfig()
        config.mode = TORCHAIR_MODES[name]
        return torchair.get_npu_backend(compiler_config=config)

    # ---- streams, events, devices (torch.npu mirrors torch.cuda's API; torch_npu 2.11) ----
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"

    def device_count(self) -> int:
        return torch.npu.device_count()

    def set_device(self, index: int) -> None:
        torch.npu.set_device(index)

    def new_stream(self) -> Any:
        return torch.npu.Stream()

    def current_stream(self) -> Any:
        return torch.npu.current_stream()

    def stream_context(self, stream: Any) -> Any:
        return torch.npu.stream(stream) if stream is not None else contextlib.nullcontext()

    def new_event(self) -> Any:
        return torch.npu.Event()

    @property
    def async_scheduling_default(self) -> bool:
        return True

    def device_name(self) -> str:
        return torch.npu.get_device_name()

    def memory_info(self) -> MemoryInfo:
        free, total = torch.npu.mem_get_info()
        return MemoryInfo(free_bytes=free, total_bytes=total)

    def synchronize(self) -> None:
        torch.npu.synchronize()

    def empty_cache(self) -> None:
        torch.npu.empty_cache()

    def reset_peak_memory(self) -> None:
        torch.npu.reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int:
        return torch.npu.max_memory_allocated()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.npu.manual_seed_all(seed)
