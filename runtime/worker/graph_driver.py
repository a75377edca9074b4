"""Drives static graphs for the model runner: picks the mode per step, runs or replays the forward.

Piecewise graphs live inside the compiled pieces (compiler/piecewise.py) and only need this step's
``GraphRuntime`` in the forward context; full graphs wrap the whole forward here.
"""
from __future__ import annotations

import logging
from typing import Any, ContextManager, Sequence

import torch
from torch import nn

from compiler import record_capture
from compiler.config import CompilationConfig
from compiler.counters import counters
from compiler.dispatcher import Dispatch, GraphDispatcher
from compiler.graphs import GraphRuntime, StaticGraphRunner
from runtime.attention.metadata import AttentionMetadata
from runtime.forward_context import BatchDescriptor, ForwardContext, set_forward_context
from runtime.platforms import current_platform

logger = logging.getLogger(__name__)


class GraphDriver:
    def __init__(self, model: nn.Module, config: CompilationConfig, max_tokens: int, max_seqs: int,
                 ubatch_streams: Sequence[Any] = ()) -> None:
        """``ubatch_streams`` (DBO): one stream per micro-batch slot, whose graphs are captured per
        size and replayed on that stream."""
        self.model = model
        self.dispatcher = GraphDispatcher(config, max_tokens, max_seqs, current_platform.supports_static_graphs)
        self.runtime = (GraphRuntime(current_platform, current_platform.graph_pool_handle(), debug=config.debug)
                        if self.dispatcher.enabled else None)
        # One runtime per micro-batch slot, each carrying its slot and its own per-step mode (the two
        # micro-batches of a step may run different modes). The two slots' streams run concurrently,
        # so nothing a graph writes may be shared between slots: each has its own memory pool (graphs
        # of one pool reuse each other's intermediates) and captures on its own stream (see
        # GraphRuntime.capture_stream).
        self.ubatch_runtimes = ([GraphRuntime(current_platform, current_platform.graph_pool_handle(),
                                              debug=config.debug, ubatch=i, capture_stream=stream)
                                 for i, stream in enumerate(ubatch_streams)] if self.runtime is not None else [])
        self.full = (StaticGraphRunner(self._forward, "full", frozenset(self.dispatcher.full_sizes), kind="full")
                     if self.dispatcher.full else None)
        # Where the KV cache is sized by profiling: the pool expected then (piecewise graphs captured, full estimated).
        self.estimated_pool_bytes: int | None = None

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def plan(self, num_tokens: int, uniform_decode: bool, ubatch: int | None = None) -> Dispatch:
        dispatch = self.dispatcher.dispatch(BatchDescriptor(num_tokens, uniform_decode, ubatch))
        if self.dispatcher.enabled and dispatch.mode == "none":
            counters.eager_fallbacks += 1
        return dispatch

    def _runtime(self, ubatch: int | None) -> GraphRuntime | None:
        return self.runtime if ubatch is None or self.runtime is None else self.ubatch_runtimes[ubatch]

    def forward_context(self, metadata: AttentionMetadata, kv_caches: dict[str, torch.Tensor],
                        dispatch: Dispatch) -> ContextManager[ForwardContext]:
        """The forward context of a step (or micro-batch) run as ``dispatch`` says."""
        return set_forward_context(metadata, kv_caches, graph_mode=dispatch.mode, batch_descriptor=dispatch.batch,
                                   graph_runtime=self._runtime(dispatch.ubatch))

    def run(self, dispatch: Dispatch, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The forward for this step (or micro-batch); call inside ``forward_context(..., dispatch)``."""
        if dispatch.mode == "full" and self.full is not None:  # None: its capture failed
            return self.full(self._runtime(dispatch.ubatch), dispatch.padded_tokens, (input_ids, positions))
        return self.model(input_ids, positions)

    def drop_failed_kinds(self) -> None:
        """After a capture: a graph kind whose capture failed anywhere is turned off (captures happen only at
        start-up, so the per-step path never checks)."""
        failed = set().union(*(r.failed_kinds for r in [self.runtime, *self.ubatch_runtimes] if r is not None))
        if "full" in failed and self.full is not None:
            self.dispatcher.disable_full("capture failed")
            self.full = None
        if "piecewise" in failed and self.dispatcher.piecewise:
            self.dispatcher.disable_piecewise("a piece's capture failed")

    def capture_sizes(self) -> list[tuple[str, int, int | None]]:
        """(mode, size, micro-batch slot) to capture at start-up, largest first (later sizes reuse its
        pool); whole-step graphs, then each DBO slot's graphs up to the largest micro-batch size."""
        if not self.dispatcher.enabled:
            return []
        plan = []
        for ubatch in [None, *(rt.ubatch for rt in self.ubatch_runtimes)]:
            graphs = [(mode, size) for mode in ("full", "piecewise") for size in self.dispatcher.sizes(mode, ubatch)]
            plan += [(mode, size, ubatch) for mode, size in sorted(graphs, key=lambda g: -g[1])]
        return plan

    def pool_bytes(self) -> int:
        """Graph pool memory captured so far (whole-step and micro-batch graphs)."""
        return sum(r.pool_bytes for r in [self.runtime, *self.ubatch_runtimes] if r is not None)

    def pool_by_mode(self) -> dict[str, float]:
        """Graph pool MiB by graph kind ("full", "piecewise"; "+ubatch" for DBO slots), summed over sizes."""
        out: dict[str, float] = {}
        for rt in [self.runtime, *self.ubatch_runtimes]:
            for (kind, _size), grown in (rt.pool_growth.items() if rt is not None else ()):
                name = kind if rt.ubatch is None else f"{kind}+ubatch"
                out[name] = out.get(name, 0.0) + grown / 2**20
        return out

    def pool_by_size(self) -> list[tuple[str, int, float]]:
        """(kind, size, MiB the pool grew by when its graphs were captured), whole-step graphs in capture order."""
        return [(kind, size, grown / 2**20) for (kind, size), grown in self.runtime.pool_growth.items()] \
            if self.runtime is not None else []

    def report_capture(self) -> None:
        """Log what was captured and hand it to the decoder's graph dump (``compiler.inspect`` shows it)."""
        if self.runtime is None:
            reason = (f"{current_platform.name.upper()}: no static graphs on this platform"
                      if not current_platform.supports_static_graphs else "graph_mode=none")
            record_capture(self.model, {"mode": "none", "reason": reason})
            return
        runtimes = [self.runtime, *self.ubatch_runtimes]
        seconds, pool = sum(r.capture_seconds for r in runtimes), sum(r.pool_bytes for r in runtimes)
        estimate = (f" (expected {self.estimated_pool_bytes / 2**20:.1f} MiB when the KV cache was sized)"
                    if self.estimated_pool_bytes is not None else "")
        logger.info("captured %d static graphs in %.1f s; graph pool %.1f MiB%s; by mode: %s", counters.graphs_captured,
                    seconds, pool / 2**20, estimate, ", ".join(f"{mode} {mib:.1f} MiB" for mode, mib in
                                                                self.pool_by_mode().items()))
        mode = "full_and_piecewise" if self.dispatcher.full and self.dispatcher.piecewise else \
            ("full" if self.dispatcher.full else "piecewise")
        record_capture(self.model, {"mode": mode, "sizes": sorted({size for _, size, _ in self.capture_sizes()}),
                                    "full_sizes": list(self.dispatcher.full_sizes), "graphs": counters.graphs_captured,
                                    "graph_pool_bytes": pool, "capture_s": seconds,
                                    "graph_pool_estimate_bytes": self.estimated_pool_bytes,
                                    "graph_pool_by_size": self.pool_by_size()})
