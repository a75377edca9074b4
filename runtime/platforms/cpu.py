"""CPU platform: the reference everything else is checked against; no static graphs."""
from __future__ import annotations

import os

import torch

from runtime.platforms.base import MemoryInfo, Platform


THREADS_ENV = "GRAPHMODE_CPU_THREADS"


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    attention_backend = "torch"
    op_kernels = "torch"
    default_compile_backend = "inductor"
    dist_backend = "gloo"
    worker_start_method = "fork"  # measured: a tiny piecewise TP=2 start 30 s (spawn) -> 7.5 s
    supports_static_graphs = False

    def configure_process(self) -> None:
        # On 2-core machines OpenMP's spinning worker costs far more than it gives at inference
        # batch sizes (measured: a decode step 25x slower with 2 threads than with 1).
        threads = os.environ.get(THREADS_ENV)
        if threads:
            torch.set_num_threads(int(threads))
        elif (os.cpu_count() or 1) <= 2:
            torch.set_num_threads(1)

    def auto_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        # CPUs run half-precision matmuls slowly and inexactly; fp32 is the useful default here.
        return torch.float32

    def device_name(self) -> str:
        import platform

        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    def memory_info(self) -> MemoryInfo:
        total = _meminfo_bytes("MemTotal")
        free = _meminfo_bytes("MemAvailable")
        if total is None or free is None:
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return MemoryInfo(free_bytes=pages // 2, total_bytes=pages)
        return MemoryInfo(free_bytes=free, total_bytes=total)
