"""Which implementation serves a fused op: the platform's own kernel, a Triton kernel, or the reference.

A platform may provide its own kernel for an op (``current_platform.op_kernel``: the vendor
library's kernels on Ascend); otherwise ``current_platform.op_kernels`` picks the generic path
("torch" on CPU, "triton" on CUDA with triton installed). ``GRAPHMODE_OP_KERNELS=torch|triton``
overrides both (e.g. "torch" to compare against the reference on a device). Triton modules are
imported on first use only, so a CPU process never imports triton.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Callable

import torch

from runtime.platforms import current_platform

KERNELS_ENV = "GRAPHMODE_OP_KERNELS"
_PROVIDERS = ("torch", "triton")


def kernel_provider() -> str:
    name = os.environ.get(KERNELS_ENV) or current_platform.op_kernels
    if name not in _PROVIDERS:
        raise ValueError(f"unknown op kernel provider {name!r}; known: {list(_PROVIDERS)}")
    return name


def platform_kernel(op_name: str) -> Callable[..., Any] | None:
    """The platform's own kernel for ``op_name`` (it returns None to decline a call), unless overridden."""
    if os.environ.get(KERNELS_ENV):
        return None
    return current_platform.op_kernel(op_name)


def run_platform_kernel(op_name: str, *args: Any) -> Any | None:
    """The platform kernel's result for this call, or None when there is none or it declines."""
    kernel = platform_kernel(op_name)
    return kernel(*args) if kernel is not None else None


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton serves the call when the platform asks for it and the tensors live where Triton runs."""
    if kernel_provider() != "triton":
        return False
    # The interpreter runs Triton on CPU tensors (kernel tests on machines without a GPU).
    device_type = current_platform.device_type
    on_device = os.environ.get("TRITON_INTERPRET") == "1" or all(t.device.type == device_type for t in tensors)
    return on_device


def triton_module(name: str) -> ModuleType:
    """``runtime.ops.<name>``, imported lazily (it imports triton)."""
    return importlib.import_module(f"runtime.ops.{name}")
