"""Drives static graphs for the model runner: picks the mode per step, runs or replays the forward.

Piecewise graphs live inside the compiled pieces (compiler/piecewise.py) and only need this step's
``GraphRuntime`` in the forward context; full graphs wrap the whole forward here.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compiler.config import CompilationConfig
from compiler.counters import counters
from compiler.dispatcher import BatchDescriptor, Dispatch, GraphDispatcher
from compiler.graphs import GRAPH_RUNTIME_KEY, GraphRuntime, StaticGraphRunner
from runtime.platforms import current_platform

logger = logging.getLogger(__name__)


class GraphDriver:
    def __init__(self, model: nn.Module, config: CompilationConfig, max_tokens: int, max_seqs: int) -> None:
        self.model = model
        self.dispatcher = GraphDispatcher(config, max_tokens, current_platform.supports_static_graphs)
        self.runtime = (GraphRuntime(current_platform, current_platform.graph_pool_handle(), debug=config.debug)
                        if self.dispatcher.enabled else None)
        # A full graph pads the batch to one sequence per token, so it is bounded by the sequence buffers.
        self.full_sizes = [s for s in self.dispatcher.sizes if s <= max_seqs] if self.dispatcher.full else []
        self.full = StaticGraphRunner(self._forward, "full", frozenset(self.full_sizes)) if self.full_sizes else None

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def plan(self, num_tokens: int, uniform_decode: bool) -> Dispatch:
        dispatch = self.dispatcher.dispatch(BatchDescriptor(num_tokens, uniform_decode))
        if dispatch.mode == "full" and dispatch.padded_tokens not in self.full_sizes:
            dispatch = self.dispatcher.dispatch(BatchDescriptor(num_tokens, False))
        if self.dispatcher.enabled and dispatch.mode == "none":
            counters.eager_fallbacks += 1
        return dispatch

    def context_extras(self) -> dict[str, Any]:
        return {GRAPH_RUNTIME_KEY: self.runtime} if self.runtime is not None else {}

    def run(self, dispatch: Dispatch, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The forward for this step; call inside the step's forward context."""
        if self.runtime is not None:
            self.runtime.mode = dispatch.mode
        if dispatch.mode == "full":
            hidden = self.full(self.runtime, dispatch.padded_tokens, (input_ids, positions))
            if self.full.failed:
                self.dispatcher.disable_full("capture failed")
                self.full, self.full_sizes = None, []
            return hidden
        return self.model(input_ids, positions)

    def capture_sizes(self) -> list[tuple[str, int]]:
        """(mode, size) pairs to capture at start-up, largest first (later sizes reuse its pool)."""
        sizes = sorted(set(self.dispatcher.sizes), reverse=True) if self.dispatcher.enabled else []
        plan = []
        for size in sizes:
            if size in self.full_sizes:
                plan.append(("full", size))
            if self.dispatcher.piecewise:
                plan.append(("piecewise", size))
        return plan

    def log_capture(self) -> None:
        if self.runtime is not None:
            logger.info("captured %d static graphs in %.1f s; graph pool %.1f MiB", counters.graphs_captured,
                        self.runtime.capture_seconds, self.runtime.pool_bytes / 2**20)
