"""Platform detection. ``current_platform`` is npu if torch_npu is installed and sees a device,
else cuda, else cpu.

``GRAPHMODE_PLATFORM`` forces a choice: ``cpu``, ``cuda``, ``npu``, or ``package.module:Class`` for
an out-of-tree Platform subclass (how a new device is tried without editing this package).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os

from runtime.plugins import platform_plugin_specs
from runtime.platforms.base import MemoryInfo, Platform
from runtime.platforms.cpu import CpuPlatform
from runtime.platforms.cuda import CudaPlatform

logger = logging.getLogger(__name__)

PLATFORM_ENV = "GRAPHMODE_PLATFORM"


class PlatformUnavailable(RuntimeError):
    """The requested platform cannot be used on this machine."""


def npu_installed() -> bool:
    # find_spec looks the package up without importing it: machines without torch_npu never load it.
    return importlib.util.find_spec("torch_npu") is not None


def _npu_platform() -> Platform:
    from runtime.platforms.npu import NpuPlatform  # imports torch_npu

    return NpuPlatform()


def _plugin_platform(spec: str) -> Platform:
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise PlatformUnavailable(f"{PLATFORM_ENV}={spec!r}: cannot load the platform class ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise PlatformUnavailable(f"{PLATFORM_ENV}={spec!r} is not a subclass of runtime.platforms.Platform")
    return cls()


def select_platform(forced: str = "") -> Platform:
    """The platform named by ``forced`` (a GRAPHMODE_PLATFORM value), or the detected one when empty."""
    forced = forced.strip()
    if ":" in forced:
        return _plugin_platform(forced)
    forced = forced.lower()
    if forced == "cpu":
        return CpuPlatform()
    if forced == "cuda":
        return CudaPlatform()
    if forced == "npu":
        if not npu_installed():
            raise PlatformUnavailable(f"{PLATFORM_ENV}=npu, but torch_npu is not installed "
                                      "(pip install 'graphmode[npu]'; see docs/platforms.md)")
        return _npu_platform()
    if forced:
        raise ValueError(f"{PLATFORM_ENV}={forced!r} is not a known platform "
                         "(choose cpu, cuda, npu, or package.module:PlatformClass)")
    plugins = platform_plugin_specs()
    if len(plugins) > 1:
        raise PlatformUnavailable(f"several platform plugins are usable here ({', '.join(sorted(plugins))}): "
                                  f"choose one with {PLATFORM_ENV}=package.module:Class")
    if plugins:
        (name, spec), = plugins.items()
        logger.info("platform from plugin %r: %s", name, spec)
        return _plugin_platform(spec)
    if npu_installed():
        try:
            platform = _npu_platform()
        except ImportError as e:  # a broken install (e.g. no CANN toolkit) must not stop a CUDA/CPU host
            logger.warning("torch_npu is installed but does not import (%s); not using the NPU platform", e)
        else:
            if platform.is_available():
                return platform
            logger.info("torch_npu is installed but sees no NPU device; not using the NPU platform")
    if CudaPlatform.is_available():
        return CudaPlatform()
    return CpuPlatform()


current_platform: Platform = select_platform(os.environ.get(PLATFORM_ENV, ""))

__all__ = ["current_platform", "select_platform", "npu_installed", "Platform", "PlatformUnavailable", "MemoryInfo",
           "CpuPlatform", "CudaPlatform", "PLATFORM_ENV"]
