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
        self.dispatcher = GraphDispatcher(config, max_tokens, current_platform.supports_static_graphs)
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
        # A full graph pads the batch to one sequence per token, so it is bounded by the sequence buffers.
        self.full_sizes = [s for s in self.dispatcher.sizes if s <= max_seqs] if self.dispatcher.full else []
        self.full = StaticGraphRunner(self._forward, "full", frozenset(self.full_sizes)) if self.full_sizes else None

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def plan(self, num_tokens: int, uniform_decode: bool, ubatch: int | None = None) -> Dispatch:
        dispatch = self.dispatcher.dispatch(BatchDescriptor(num_tokens, uniform_decode, ubatch))
        if dispatch.mode == "full" and dispatch.padded_tokens not in self.full_sizes:
            dispatch = self.dispatcher.dispatch(BatchDescriptor(num_tokens, False, ubatch))
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
        if dispatch.mode == "full":
            hidden = self.full(self._runtime(dispatch.ubatch), dispatch.padded_tokens, (input_ids, positions))
            if self.full.failed:
                self.dispatcher.disable_full("capture failed")
                self.full, self.full_sizes = None, []
            return hidden
        return self.model(input_ids, positions)

    def capture_sizes(self) -> list[tuple[str, int, int | None]]:
        """(mode, size, micro-batch slot) to capture at start-up, largest first (later sizes reuse its
        pool); whole-step graphs, then each DBO slot's graphs up to the largest micro-batch size."""
        if not self.dispatcher.enabled:
            return []
        plan = []
        slots = [(None, self.dispatcher.sizes)] + [(rt.ubatch, self.dispatcher.ubatch_sizes)
                                                    for rt in self.ubatch_runtimes]
        for ubatch, sizes in slots:
            for size in sorted(set(sizes), reverse=True):
                if size in self.full_sizes:
                    plan.append(("full", size, ubatch))
                if self.dispatcher.piecewise:
                    plan.append(("piecewise", size, ubatch))
        return plan

    def pool_bytes(self) -> int:
        """Graph pool memory captured so far (whole-step and micro-batch graphs)."""
        return sum(r.pool_bytes for r in [self.runtime, *self.ubatch_runtimes] if r is not None)

    def report_capture(self) -> None:
        """Log what was captured and hand it to the decoder's graph dump (``compiler.inspect`` shows it)."""
        if self.runtime is None:
            reason = (f"{current_platform.name.upper()}: no static graphs on this platform"
                      if not current_platform.supports_static_graphs else "graph_mode=none")
            record_capture(self.model, {"mode": "none", "reason": reason})
            return
        runtimes = [self.runtime, *self.ubatch_runtimes]
        seconds, pool = sum(r.capture_seconds for r in runtimes), sum(r.pool_bytes for r in runtimes)
        logger.info("captured %d static graphs in %.1f s; graph pool %.1f MiB", counters.graphs_captured, seconds,
                    pool / 2**20)
        mode = "full_and_piecewise" if self.dispatcher.full and self.dispatcher.piecewise else \
            ("full" if self.dispatcher.full else "piecewise")
        record_capture(self.model, {"mode": mode, "sizes": sorted({size for _, size, _ in self.capture_sizes()}),
                                    "full_sizes": sorted(self.full_sizes), "graphs": counters.graphs_captured,
                                    "graph_pool_bytes": pool, "capture_s": seconds})
