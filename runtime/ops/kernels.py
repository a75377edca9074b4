"""Which implementation serves a fused op: the torch reference or a Triton kernel.

``current_platform.op_kernels`` decides ("torch" on CPU, "triton" on CUDA with triton installed);
``GRAPHMODE_OP_KERNELS=torch|triton`` overrides it (e.g. to compare against the reference on a GPU).
Triton modules are imported on first use only, so a CPU process never imports triton.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from runtime.platforms import current_platform

KERNELS_ENV = "GRAPHMODE_OP_KERNELS"
_PROVIDERS = ("torch", "triton")


def kernel_provider() -> str:
    name = os.environ.get(KERNELS_ENV) or current_platform.op_kernels
    if name not in _PROVIDERS:
        raise ValueError(f"unknown op kernel provider {name!r}; known: {list(_PROVIDERS)}")
    return name


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton serves the call when the platform asks for it and the tensors live where Triton runs."""
    if kernel_provider() != "triton":
        return False
    # The interpreter runs Triton on CPU tensors (kernel tests on machines without a GPU).
    on_device = os.environ.get("TRITON_INTERPRET") == "1" or all(t.is_cuda for t in tensors)
    return on_device


def triton_module(name: str) -> ModuleType:
    """``runtime.ops.<name>``, imported lazily (it imports triton)."""
    return importlib.import_module(f"runtime.ops.{name}")
