"""Compiling one piece with the configured backend ("eager" or "inductor"), through the compile cache."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from compiler.cache import CompileCache
from compiler.counters import counters

logger = logging.getLogger(__name__)


def concrete_inputs(fake_args: list[Any], size: int) -> list[Any]:
    """Static-shape stand-ins for ``fake_args`` with every symbolic dim set to ``size``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def concrete(dim: Any) -> int:
        if isinstance(dim, torch.SymInt):
            expr = dim.node.expr
            return int(expr.subs({s: size for s in expr.free_symbols}))
        return int(dim)

    mode = FakeTensorMode()
    out = []
    with mode:
        for arg in fake_args:
            if isinstance(arg, torch.Tensor):
                shape = [concrete(d) for d in arg.shape]
                stride = [concrete(s) for s in arg.stride()]
                out.append(torch.empty_strided(shape, stride, dtype=arg.dtype, device=arg.device))
            elif isinstance(arg, torch.SymInt):
                out.append(concrete(arg))
            else:
                out.append(arg)
    return out


def _inductor_compile(gm: torch.fx.GraphModule, example_inputs: list[Any], static: bool) -> Any:
    # The dynamic compile takes its symbols from Dynamo's tracing context (we run inside the backend
    # call); a per-size compile gets concrete example inputs.
    shapes = "from_example_inputs" if static else "from_tracing_context"
    return torch._inductor.standalone_compile(gm, example_inputs, dynamic_shapes=shapes)


def _returns_single_value(gm: torch.fx.GraphModule) -> bool:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return not isinstance(output.args[0], (tuple, list))


def _unwrap_single(fn: Callable) -> Callable:
    """A loaded Inductor artefact returns a sequence where a fresh compile returns the bare value;
    the split module expects the bare value."""

    def call(*args: Any) -> Any:
        out = fn(*args)
        return out[0] if isinstance(out, (list, tuple)) else out

    return call


def compile_piece(piece: torch.fx.GraphModule, fake_args: list[Any], backend: str, cache: CompileCache | None,
                  size: int | None = None, transform: Callable[[], torch.fx.GraphModule] | None = None) -> Callable:
    """A callable for ``piece``; ``size`` None means the dynamic-shape compile.

    ``transform`` produces the graph to compile (the piece after passes). The cache key is taken
    from the untransformed piece (the pass pipeline is part of the global key), so a cache hit
    skips the passes as well as Inductor.
    """
    transform = transform or (lambda: piece)
    fn = _compile(piece, transform, fake_args, backend, cache, size)
    return _unwrap_single(fn) if backend != "eager" and _returns_single_value(piece) else fn


def _compile(piece: torch.fx.GraphModule, transform: Callable[[], torch.fx.GraphModule], fake_args: list[Any],
             backend: str, cache: CompileCache | None, size: int | None) -> Callable:
    counters.backend_compilations += 1
    if backend == "eager":
        return transform()
    if backend != "inductor":
        raise ValueError(f"unknown compile backend {backend!r} (known: eager, inductor)")
    example = fake_args if size is None else concrete_inputs(fake_args, size)
    key = cache.key_for(piece, example, size) if cache is not None else None
    if key is not None:
        artifact = cache.load(key)
        if artifact is not None:
            counters.cache_hits += 1
            return artifact
        counters.cache_misses += 1
    gm = transform()
    gm_copy = torch.fx.GraphModule(gm, gm.graph) if size is not None else gm
    artifact = _inductor_compile(gm_copy, example, static=size is not None)
    if key is not None:
        cache.save(key, artifact)
    return artifact
