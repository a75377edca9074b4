"""The attention custom op: the seam between the compiled graph and the paged KV cache.

Registered with torch.library so Dynamo sees one opaque node (``graphmode::attention``) that the
compiler can split the graph at. The op mutates ``out`` instead of returning a tensor so that, in
piecewise graphs, the output buffer is allocated by the preceding piece and keeps its address.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from runtime.forward_context import get_forward_context
from runtime.ops.library import graph_op
from runtime.platforms import current_platform

ATTENTION_OP = "graphmode::attention"
# Forces a backend for every platform (e.g. "torch" to compare against the reference on a GPU).
BACKEND_ENV = "GRAPHMODE_ATTENTION_BACKEND"

_BACKENDS = {
    "torch": "runtime.attention.torch_backend",
    "triton": "runtime.attention.triton_kernels",
}


def attention_backend(name: str | None = None) -> ModuleType:
    """The module providing ``store_kv`` and ``paged_attention`` for this platform (and, optionally,
    ``store_kv_and_attend``: both in fewer launches)."""
    return _backend_module(name or os.environ.get(BACKEND_ENV) or current_platform.attention_backend)


@functools.cache
def _backend_module(name: str) -> ModuleType:
    # Generic backends live here; a platform adds its own (Ascend's, for one).
    backends = {**_BACKENDS, **current_platform.extra_attention_backends()}
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(backends)}")
    return importlib.import_module(backends[name])


@graph_op(ATTENTION_OP, mutates_args=("out",))
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    layer_name: str,
    scale: float,
    sliding_window: int,
) -> None:
    """query/out [T, H, D], key/value [T, KVH, D]; sliding_window <= 0 means none."""
    ctx = get_forward_context()
    metadata = ctx.attn_metadata
    if metadata is None:
        raise RuntimeError("attention op called without attention metadata in the forward context")
    try:
        kv_cache = ctx.kv_caches[layer_name]
    except KeyError:
        raise RuntimeError(f"no KV cache registered for attention layer {layer_name!r}") from None
    backend = attention_backend()
    window = sliding_window if sliding_window > 0 else None
    # A backend may store the step's keys and values inside its attention kernel (one launch less).
    store_and_attend = getattr(backend, "store_kv_and_attend", None)
    if store_and_attend is not None:
        store_and_attend(query, key, value, kv_cache, metadata, scale, window, out)
        return
    backend.store_kv(key, value, kv_cache, metadata.slot_mapping)
    backend.paged_attention(query, kv_cache, metadata, scale, window, out)


@attention.register_fake
def _attention_fake(query, key, value, out, layer_name, scale, sliding_window) -> None:
    return None
