"""Platform detection. ``current_platform`` is npu if torch_npu imports, else cuda, else cpu.

``GRAPHMODE_PLATFORM=cpu|cuda|npu`` forces a choice (for tests and for running a GPU host on CPU).
"""
from __future__ import annotations

import importlib.util
import logging
import os

from runtime.platforms.base import MemoryInfo, Platform
from runtime.platforms.cpu import CpuPlatform
from runtime.platforms.cuda import CudaPlatform

logger = logging.getLogger(__name__)

PLATFORM_ENV = "GRAPHMODE_PLATFORM"


def _detect() -> Platform:
    forced = os.environ.get(PLATFORM_ENV, "").strip().lower()
    if forced == "cpu":
        return CpuPlatform()
    if forced == "cuda":
        return CudaPlatform()
    if forced:
        raise ValueError(f"{PLATFORM_ENV}={forced!r} is not a known platform (choose cpu or cuda)")
    # find_spec does not import torch_npu: machines without it never touch it.
    if importlib.util.find_spec("torch_npu") is not None:
        logger.info("torch_npu is installed but the NPU platform is not built yet; using %s",
                    "cuda" if CudaPlatform.is_available() else "cpu")
    if CudaPlatform.is_available():
        return CudaPlatform()
    return CpuPlatform()


current_platform: Platform = _detect()

__all__ = ["current_platform", "Platform", "MemoryInfo", "CpuPlatform", "CudaPlatform", "PLATFORM_ENV"]
