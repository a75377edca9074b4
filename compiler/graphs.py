"""Static device graphs (CUDA graphs; ACL graphs on Ascend) around a callable, one per capture size.

``StaticGraphRunner`` wraps a compiled piece (piecewise mode) or a whole forward (full mode). The
first call at a size runs eagerly (warm-up: autotuning, lazy init), the second captures, later ones
replay. Inputs must keep their addresses across replays (persistent runner buffers, outputs of
earlier graphs in the shared pool); the debug mode checks that. The graph class, pool and capture
context all come from the platform.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from compiler.counters import counters
from runtime.platforms import Platform

logger = logging.getLogger(__name__)

@dataclass
class GraphRuntime:
    """One graph slot's resources (pool, capture stream) and costs; a step carries its slot in the
    forward context."""
    platform: Platform
    pool: Any
    debug: bool = False
    # DBO micro-batch slot this runtime serves (None: whole steps). Each slot has its own graphs:
    # the two micro-batches of a step may have the same size and must not share output buffers.
    ubatch: int | None = None
    # Stream to capture on (None: the platform's). A DBO slot captures on the stream it replays on:
    # libraries keep per-stream workspaces (cuBLAS), and a graph bakes in the one of its capture
    # stream, so two slots captured on one stream would share it while replaying concurrently.
    capture_stream: Any = None
    capture_seconds: float = 0.0
    pool_bytes: int = 0


@dataclass
class _Entry:
    graph: Any
    output: Any
    input_addresses: list[int]


@dataclass
class StaticGraphRunner:
    fn: Callable
    name: str
    capture_sizes: frozenset[int]
    entries: dict[tuple[int | None, int], _Entry] = field(default_factory=dict)  # (ubatch, size) ->
    warmed: set[tuple[int | None, int]] = field(default_factory=set)
    failed: bool = False

    def __call__(self, runtime: GraphRuntime, size: int, args: tuple[Any, ...]) -> Any:
        if self.failed or size not in self.capture_sizes:
            return self.fn(*args)
        key = (runtime.ubatch, size)
        entry = self.entries.get(key)
        if entry is not None:
            if runtime.debug:
                _check_addresses(self.name, size, entry.input_addresses, args)
            entry.graph.replay()
            counters.graph_replays += 1
            return entry.output
        if key not in self.warmed:
            self.warmed.add(key)
            return self.fn(*args)
        return self._capture(runtime, size, args)

    def _capture(self, runtime: GraphRuntime, size: int, args: tuple[Any, ...]) -> Any:
        platform = runtime.platform
        graph = platform.new_graph()
        start, before = time.perf_counter(), platform.memory_allocated()
        try:
            with platform.graph_capture(graph, runtime.pool, runtime.capture_stream):
                output = self.fn(*args)
        except Exception as e:  # noqa: BLE001 - an uncapturable op degrades this runner, never crashes
            logger.warning("static graph %s could not be captured at size %d (%s: %s); running it without graphs",
                           self.name, size, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.failed = True
            return self.fn(*args)
        runtime.capture_seconds += time.perf_counter() - start
        runtime.pool_bytes += max(0, platform.memory_allocated() - before)
        self.entries[(runtime.ubatch, size)] = _Entry(graph, output, _addresses(args))
        counters.graphs_captured += 1
        # Capture records work without running it: replay once so this call returns real values.
        graph.replay()
        return output


def _addresses(args: tuple[Any, ...]) -> list[int]:
    return [a.data_ptr() if isinstance(a, torch.Tensor) else -1 for a in args]


def _check_addresses(name: str, size: int, expected: list[int], args: tuple[Any, ...]) -> None:
    actual = _addresses(args)
    moved = [i for i, (a, b) in enumerate(zip(expected, actual)) if a != b]
    if moved:
        raise RuntimeError(f"static graph {name} (size {size}): inputs {moved} changed address since capture; "
                           "a replay would read stale memory")
