"""The forward context: per-step state that ops read without it passing through the model.

The model's forward takes only tokens and positions; the attention op finds its layer's KV
cache and the step's metadata here. This is one of the two pieces of global mutable state the
project allows (the other is ``compiler.counters``). The context is per thread: under dual-batch
overlap (runtime/ubatching.py) each micro-batch thread sets its own, with its own metadata.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from runtime.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata | None
    # layer name -> KV cache tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
    kv_caches: dict[str, torch.Tensor] = field(default_factory=dict)
    # Free-form per-step flags (e.g. micro-batch id); kept small on purpose.
    extras: dict[str, object] = field(default_factory=dict)


class _PerThread(threading.local):
    context: ForwardContext | None = None


_state = _PerThread()


def get_forward_context() -> ForwardContext:
    context = _state.context
    if context is None:
        raise RuntimeError(
            "no forward context is set: run the model inside runtime.forward_context.set_forward_context(...)"
        )
    return context


def has_forward_context() -> bool:
    return _state.context is not None


def current_forward_context() -> ForwardContext | None:
    return _state.context


@contextlib.contextmanager
def set_forward_context(
    attn_metadata: AttentionMetadata | None,
    kv_caches: dict[str, torch.Tensor],
    **extras: object,
) -> Iterator[ForwardContext]:
    previous = _state.context
    context = _state.context = ForwardContext(attn_metadata, kv_caches, dict(extras))
    try:
        yield context
    finally:
        _state.context = previous
