"""The Dynamo backend: passes -> split at splitting ops -> compile each piece -> dispatching module.

Dynamo calls ``GraphModeBackend`` once per trace with the traced graph; what it returns is what
runs from then on. The returned object is the split graph module whose compiled pieces were
replaced by ``PiecewiseBackend`` callables, so calling it runs the pieces in order with the
splitting ops (attention) between them.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from typing import Any, Callable

import torch
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from compiler.cache import CompileCache
from compiler.compile_piece import compile_piece
from compiler.compiler_interface import CompilerInterface
from compiler.config import CompilationConfig, resolve_cache_dir
from compiler.counters import counters
from compiler.dump import GraphDump
from compiler.piecewise import PiecewiseBackend, find_size_arg
from compiler.split import Piece, graph_op_counts, split_graph

logger = logging.getLogger(__name__)


def _example_values(piece: torch.fx.GraphModule) -> list[Any] | None:
    """The piece's inputs as Dynamo saw them (fake tensors, SymInts), or None where one is not recorded."""
    values = [n.meta.get("example_value") for n in piece.graph.nodes if n.op == "placeholder"]
    return None if any(v is None for v in values) else values


class GraphModeBackend:
    def __init__(self, config: CompilationConfig, tag: str, compiler: CompilerInterface, model_source_hash: str,
                 platform_name: str, pass_manager: Any | None = None) -> None:
        self.config, self.tag, self.compiler = config, tag, compiler
        self.pass_manager = pass_manager
        pass_uuid = pass_manager.uuid() if pass_manager is not None else "no-passes"
        self.cache = None
        self.cache_directory = None  # this config's entries under the cache root: compiled pieces, traces
        if config.compile_sizes and not compiler.compiles_per_size:
            logger.warning("%s: compile_sizes are ignored: the %s backend compiles one graph for every size", tag,
                           compiler.name)
        cache_root = resolve_cache_dir(config.cache_dir)
        if cache_root:
            key = CompileCache.make_global_key(config.code_hash(), pass_uuid, model_source_hash, platform_name)
            self.cache_directory = os.path.join(cache_root, key)
            if config.cache_dir and not compiler.supports_cache:
                logger.info("%s: cache_dir keeps only the traced graph: the %s backend's pieces are not compiled",
                            tag, compiler.name)
            elif compiler.supports_cache:
                try:
                    self.cache = CompileCache(cache_root, key)
                except OSError as e:  # a root that cannot be written (read-only home) only costs the warm start
                    logger.warning("%s: compile cache at %s is unusable (%s); compiling without it", tag,
                                   cache_root, e)
        self.dump = GraphDump(config.dump_dir, tag) if config.dump_dir else None
        self.pieces: list[Piece] = []
        self.timings: dict[str, float] = {}
        self.split_module: torch.fx.GraphModule | None = None  # what Dynamo's code calls after the trace
        self._pass_code: dict[str, list[str]] = defaultdict(list)  # for dumps: per pass, each piece's code
        self.compiled_op_counts: dict[str, dict[str, int]] = {}  # piece name -> ops of what was compiled
        self.trace_started: float | None = None  # set by the decorator as the first call enters Dynamo

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        counters.dynamo_traces += 1
        counters.traces_by_tag[self.tag] += 1
        return self.build(gm, example_inputs)

    def build(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        """What runs ``gm`` from now on; ``gm`` comes from Dynamo (``__call__``) or a saved trace."""
        start = time.perf_counter()
        if self.trace_started is not None:
            # Dynamo's trace up to handing us the graph, or loading the saved one (compiler/trace_cache.py)
            self.timings["trace_s"] = start - self.trace_started
        if self.dump:
            self.dump.write_graph("dynamo", gm, f"{self.tag}: graph traced by Dynamo")
        split_gm, self.pieces = split_graph(gm, self.config.splitting_ops)
        compiled = [p for p in self.pieces if not p.is_splitting_op]
        counters.piecewise_graphs += len(compiled)
        hits_before, misses_before = counters.cache_hits, counters.cache_misses
        self._compile_pieces(split_gm, example_inputs)
        self.timings["compile_s"] = time.perf_counter() - start
        cache_state = self._cache_state(hits_before, misses_before)
        logger.info("%s: compiled %d pieces (%d splitting ops) with %s in %.2f s; cache %s", self.tag,
                    len(compiled), len(self.pieces) - len(compiled), self.compiler.name, self.timings["compile_s"],
                    cache_state)
        if self.dump:
            self.dump.record_pieces(self.pieces, self.compiled_op_counts)
            self._dump_passes()
            self.dump.set(config=self.config.to_dict(), backend=self.compiler.name, cache=cache_state,
                          timings_s=dict(self.timings), counters=counters.snapshot())
            self.dump.flush()
        self.split_module = split_gm
        return split_gm

    def record_capture(self, capture: dict[str, Any]) -> None:
        """What the runtime captured from this tag's graphs (mode, sizes, graph pool, seconds), for the dump."""
        if self.dump:
            self.dump.set(capture=capture)
            self.dump.flush()

    def _dump_passes(self) -> None:
        if self.pass_manager is None:
            return
        self.dump.write_text("aten", "\n\n".join(self._pass_code["aten"]), f"{self.tag}: compiled pieces in ATen, before passes")
        previous = "aten.py"
        entries = []
        for name in self.pass_manager.names:
            self.dump.write_text(f"after_{name}", "\n\n".join(self._pass_code[name]), f"{self.tag}: after pass {name}")
            entries.append({"name": name, "matches": self.pass_manager.match_counts.get(name, 0), "file": f"after_{name}.py",
                            "before": previous})
            previous = f"after_{name}.py"
        self.dump.set(passes=entries, passes_stage="pieces")  # passes ran on each piece, after the split

    def _cache_state(self, hits_before: int, misses_before: int) -> str:
        if self.cache is None:
            return "off"
        hits, misses = counters.cache_hits - hits_before, counters.cache_misses - misses_before
        return "hit" if hits and not misses else ("miss" if misses and not hits else f"{hits} hits/{misses} misses")

    def _compile_pieces(self, split_gm: torch.fx.GraphModule, example_inputs: list[Any]) -> None:
        """Compile each piece with the fake args it receives: its placeholders' example values (the split
        copies them from Dynamo's nodes), else those of a walk of the split module on fake inputs."""
        by_name = {p.name: p for p in self.pieces}
        inputs = {p.name: _example_values(p.module) for p in self.pieces if not p.is_splitting_op}
        if all(v is not None for v in inputs.values()):
            for name, fake_args in inputs.items():
                split_gm.__dict__[name] = self._compile_one(by_name[name], fake_args)
            return
        fake_mode = detect_fake_mode(example_inputs)
        # The fake mode memoises Dynamo's fakes of these tensors, symbolic dims included.
        fake_inputs = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        backend = self

        class _Compiler(torch.fx.Interpreter):
            def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
                piece = by_name[target]
                output = super().call_module(target, args, kwargs)
                if not piece.is_splitting_op:
                    # Instance __dict__ wins over nn.Module's _modules lookup, so the generated code
                    # calls the compiled piece while the original stays in _modules for dumps.
                    split_gm.__dict__[target] = backend._compile_one(piece, list(args))
                return output

        with fake_mode:
            _Compiler(split_gm).run(*fake_inputs)

    def _transform(self, piece: Piece, fake_args: list[Any]) -> torch.fx.GraphModule:
        """Lower a piece to ATen and run the passes on it (ATen, because that is where the fusion
        patterns are stable: method/function spellings and dtype casts are normalised)."""
        if self.pass_manager is None:
            return piece.module
        start = time.perf_counter()
        aten = make_fx(piece.module, tracing_mode="fake", _allow_non_fake_inputs=True)(*fake_args)
        before = dict(self.pass_manager.match_counts)
        if self.dump:
            self._pass_code["aten"].append(aten.code)
            self.pass_manager.graphs_after.clear()
        aten = self.pass_manager(aten)
        for name, total in self.pass_manager.match_counts.items():
            counters.pass_matches[name] += total - before.get(name, 0)
        if self.dump:
            for name, code in self.pass_manager.graphs_after.items():
                self._pass_code[name].append(code)
        self.timings["passes_s"] = self.timings.get("passes_s", 0.0) + time.perf_counter() - start
        return aten

    def _compile_one(self, piece: Piece, fake_args: list[Any]) -> PiecewiseBackend:
        transformed: list[torch.fx.GraphModule] = []

        def transform() -> torch.fx.GraphModule:  # run the passes at most once, and only if needed
            if not transformed:
                transformed.append(self._transform(piece, fake_args))
                self.compiled_op_counts[piece.name] = graph_op_counts(transformed[0])
            return transformed[0]

        general = compile_piece(piece.module, fake_args, self.compiler, self.cache, transform=transform)
        by_size = {size: compile_piece(piece.module, fake_args, self.compiler, self.cache, size, transform)
                   for size in self.config.compile_sizes} if self.compiler.compiles_per_size else {}
        capture = (self.config.piecewise_sizes()
                   if self.config.graph_mode in ("piecewise", "full_and_piecewise") else None)
        return PiecewiseBackend(piece.name, general, by_size, find_size_arg(fake_args), capture)
