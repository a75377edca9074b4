"""The forward context: per-step state that ops read without it passing through the model.

The model's forward takes only tokens and positions; the attention op finds its layer's KV
cache and the step's metadata here. This is one of the two pieces of global mutable state the
project allows (the other is ``compiler.counters``).
"""
from __future__ import annotations

import contextlib
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


_forward_context: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _forward_context is None:
        raise RuntimeError(
            "no forward context is set: run the model inside runtime.forward_context.set_forward_context(...)"
        )
    return _forward_context


def has_forward_context() -> bool:
    return _forward_context is not None


def current_forward_context() -> ForwardContext | None:
    return _forward_context


@contextlib.contextmanager
def set_forward_context(
    attn_metadata: AttentionMetadata | None,
    kv_caches: dict[str, torch.Tensor],
    **extras: object,
) -> Iterator[ForwardContext]:
    global _forward_context
    previous = _forward_context
    _forward_context = ForwardContext(attn_metadata, kv_caches, dict(extras))
    try:
        yield _forward_context
    finally:
        _forward_context = previous
