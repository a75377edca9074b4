"""Static device graphs (CUDA graphs; ACL graphs on Ascend) around a callable, one per capture size.

``StaticGraphRunner`` wraps a compiled piece (piecewise mode) or a whole forward (full mode). The
first call at a size runs eagerly (warm-up: autotuning, lazy init, and the Triton variants a size
picks: kernels choose constexprs such as the attention's split count from the shapes, and a variant
compiled inside a capture fails it), the second captures, later ones replay. Inputs must keep their
addresses across replays (persistent runner buffers, outputs of earlier graphs in the shared pool);
the debug mode checks that. The graph class, pool and capture context all come from the platform.

A graph's output is kept as a view that does not own its memory: once the capture's forward is done
with it, the memory goes back to the pool and later captures (smaller sizes, other pieces) reuse it, so
the pool holds about one forward's intermediates instead of one output per graph. A replay writes the
output again, and whoever reads it does so before the next replay of a graph of that pool: steps run
one at a time per pool (each DBO slot has its own), and a caller that keeps an output copies it.
"""
from __future__ import annotations

import inspect
import logging
import os
import sysconfig
import time
import traceback
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
    # Pool growth per (kind, size) captured, in capture order: what each graph cost on top of the ones
    # before it (the largest, captured first, pays for nearly all).
    pool_growth: dict[tuple[str, int], int] = field(default_factory=dict)
    # Kinds whose capture failed here: a failed piece hands the next piece a fresh tensor each call, where
    # that piece's graph reads the address it was captured with, so one failure turns its whole kind off.
    failed_kinds: set[str] = field(default_factory=set)


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
    kind: str = "graph"  # what the pool report groups it under: "full", "piecewise", "encoder"
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
        start, before = time.perf_counter(), platform.memory_reserved()
        try:
            with platform.graph_capture(graph, runtime.pool, runtime.capture_stream):
                output = self.fn(*args)
        except Exception as e:  # noqa: BLE001 - an uncapturable op degrades this runner, never crashes
            logger.warning("static graph %s could not be captured at size %d: %s; running it without graphs",
                           self.name, size, describe_capture_failure(e, platform))
            self.failed = True
            runtime.failed_kinds.add(self.kind)
            # Later captures get a pool of their own: the failed one may still be registered as recording
            # with the allocator (its capture never ended cleanly), and a capture into it is refused.
            runtime.pool = platform.graph_pool_handle()
            return self.fn(*args)
        runtime.capture_seconds += time.perf_counter() - start
        grown = max(0, platform.memory_reserved() - before)
        runtime.pool_bytes += grown
        key = (self.kind, size)
        runtime.pool_growth[key] = runtime.pool_growth.get(key, 0) + grown
        self.entries[(runtime.ubatch, size)] = _Entry(graph, non_owning(output), _addresses(args))
        counters.graphs_captured += 1
        # Capture records work without running it: replay once so this call returns real values.
        graph.replay()
        return output


def non_owning(value: Any) -> Any:
    """``value`` (a tensor, or a tuple/list of them) as views that do not keep their memory allocated."""
    if isinstance(value, (tuple, list)):
        return type(value)(non_owning(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    storage = value.untyped_storage()
    # A storage over the same address without a deleter: Inductor's CUDA graph trees keep their graph
    # outputs the same way (torch/_inductor/cudagraph_trees.py).
    alias = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), value.device, storage.nbytes())
    return torch.empty((), dtype=value.dtype, device=value.device).set_(
        alias, value.storage_offset(), value.shape, value.stride())


# Frames that are never the op at fault: torch, the standard library, graph capture itself, the platforms.
_NOT_THE_OP = (os.path.dirname(torch.__file__), sysconfig.get_paths()["stdlib"], __file__,
               os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime", "platforms"))


def describe_capture_failure(error: BaseException, platform: Platform) -> str:
    """The error and the innermost frame of the op that raised it (the line that synced the host or
    allocated outside the pool), so the log names what to fix."""
    frames = traceback.extract_tb(error.__traceback__)
    not_the_op = (*_NOT_THE_OP, inspect.getfile(type(platform)))
    ours = [f for f in frames if not f.filename.startswith(not_the_op)]
    where = f" (in {ours[-1].name}, {ours[-1].filename}:{ours[-1].lineno}: {ours[-1].line})" if ours else ""
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first_line}{where}"


def _addresses(args: tuple[Any, ...]) -> list[int]:
    return [a.data_ptr() if isinstance(a, torch.Tensor) else -1 for a in args]


def _check_addresses(name: str, size: int, expected: list[int], args: tuple[Any, ...]) -> None:
    actual = _addresses(args)
    moved = [i for i, (a, b) in enumerate(zip(expected, actual)) if a != b]
    if moved:
        raise RuntimeError(f"static graph {name} (size {size}): inputs {moved} changed address since capture; "
                           "a replay would read stale memory")
