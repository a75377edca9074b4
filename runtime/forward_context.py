"""The forward context: per-step state that ops read without it passing through the model.

The model's forward takes only tokens and positions; the attention op finds its layer's KV cache
and the step's metadata here, and compiled pieces find which static graph mode the step runs. This
is one of the two pieces of global mutable state the project allows (the other is
``compiler.counters``). The context is per thread: under dual-batch overlap (runtime/ubatching.py)
each micro-batch thread sets its own, with its own metadata and graph slot.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Literal

import torch

from runtime.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from compiler.graphs import GraphRuntime

GraphMode = Literal["none", "piecewise", "full"]


@dataclass(frozen=True)
class BatchDescriptor:
    """What decides a step's graph: its token count, whether it is a uniform decode, its DBO slot."""
    num_tokens: int
    uniform_decode: bool  # every request contributes exactly one token
    ubatch: int | None = None  # DBO micro-batch slot (0 or 1); None for a whole step


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata | None
    # layer name -> KV cache tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
    kv_caches: dict[str, torch.Tensor] = field(default_factory=dict)
    graph_mode: GraphMode = "none"  # what this step replays: compiled pieces check for "piecewise"
    batch_descriptor: BatchDescriptor | None = None
    # The static-graph slot this step captures into and replays from (its pool and capture stream);
    # None when graphs are off.
    graph_runtime: GraphRuntime | None = None


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


def current_forward_context() -> ForwardContext | None:
    return _state.context


@contextlib.contextmanager
def set_forward_context(attn_metadata: AttentionMetadata | None, kv_caches: dict[str, torch.Tensor], *,
                        graph_mode: GraphMode = "none", batch_descriptor: BatchDescriptor | None = None,
                        graph_runtime: GraphRuntime | None = None) -> Iterator[ForwardContext]:
    previous = _state.context
    context = _state.context = ForwardContext(attn_metadata, kv_caches, graph_mode, batch_descriptor, graph_runtime)
    try:
        yield context
    finally:
        _state.context = previous
