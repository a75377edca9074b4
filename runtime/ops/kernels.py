"""Which implementation serves a fused op: the platform's own kernel, a Triton kernel, or the reference.

A platform may provide its own kernel for an op (``current_platform.op_kernel``: the vendor
library's kernels on Ascend); otherwise ``current_platform.op_kernels`` picks the generic path
("torch" on CPU, "triton" on CUDA with triton installed). ``GRAPHMODE_OP_KERNELS`` overrides both:
``torch`` or ``triton`` for every op, and ``OP=PROVIDER`` items for single ops, comma-separated
(``triton,rotary_embedding=torch``: the reference rotary, Triton for the rest). Swapping one op at a
time for its reference is how a numerical difference is traced to its kernel. Triton modules are
imported on first use only, so a CPU process never imports triton.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Any, Callable

import torch

from runtime.platforms import current_platform

KERNELS_ENV = "GRAPHMODE_OP_KERNELS"
_PROVIDERS = ("torch", "triton")


def _short(op_name: str) -> str:
    return op_name.split("::")[-1]


def _overrides() -> tuple[str | None, dict[str, str]]:
    """(provider for every op, {op: provider}) from GRAPHMODE_OP_KERNELS."""
    return _parse_overrides(os.environ.get(KERNELS_ENV, ""))


@functools.lru_cache(maxsize=8)
def _parse_overrides(raw: str) -> tuple[str | None, dict[str, str]]:
    # Cached by the variable's text: every fused-op call asks, and eager decode makes ~100 per step.
    everything, per_op = None, {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        op, _, provider = item.rpartition("=")
        if provider not in _PROVIDERS:
            raise ValueError(f"{KERNELS_ENV}: unknown op kernel provider {provider!r} in {item!r}; "
                             f"known: {list(_PROVIDERS)}")
        if op:
            per_op[_short(op)] = provider
        else:
            everything = provider
    return everything, per_op


def kernel_provider(op_name: str | None = None) -> str:
    """"torch" or "triton": who serves ``op_name`` (any op when None) unless the platform has its own."""
    everything, per_op = _overrides()
    name = (per_op.get(_short(op_name)) if op_name else None) or everything or current_platform.op_kernels
    if name not in _PROVIDERS:
        raise ValueError(f"unknown op kernel provider {name!r}; known: {list(_PROVIDERS)}")
    return name


def reference_asked_for(op_name: str) -> bool:
    """GRAPHMODE_OP_KERNELS names "torch" (the reference) for ``op_name``, or for every op."""
    everything, per_op = _overrides()
    return (per_op.get(_short(op_name)) or everything) == "torch"


def platform_kernel(op_name: str) -> Callable[..., Any] | None:
    """The platform's own kernel for ``op_name`` (it returns None to decline a call), unless
    GRAPHMODE_OP_KERNELS names a provider for this op."""
    everything, per_op = _overrides()
    if everything or _short(op_name) in per_op:
        return None
    return current_platform.op_kernel(op_name)


def run_platform_kernel(op_name: str, *args: Any) -> Any | None:
    """The platform kernel's result for this call, or None when there is none or it declines."""
    kernel = platform_kernel(op_name)
    return kernel(*args) if kernel is not None else None


def use_triton(op_name: str, *tensors: torch.Tensor) -> bool:
    """Triton serves this call of ``op_name`` when the platform (or the override) asks for it and
    the tensors live where Triton runs."""
    if kernel_provider(op_name) != "triton":
        return False
    # The interpreter runs Triton on CPU tensors (kernel tests on machines without a GPU).
    device_type = current_platform.device_type
    on_device = os.environ.get("TRITON_INTERPRET") == "1" or all(t.device.type == device_type for t in tensors)
    return on_device


def triton_module(name: str) -> ModuleType:
    """``runtime.ops.<name>``, imported lazily (it imports triton)."""
    return importlib.import_module(f"runtime.ops.{name}")
