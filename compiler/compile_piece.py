"""Compiling one piece with the configured backend ("eager", "inductor" or one the platform provides,
such as Ascend's graph compiler), through the compile cache (inductor only)."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from compiler.cache import CompileCache
from compiler.counters import counters
from runtime.platforms import current_platform

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


def _platform_compile(backend: str, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """A compile backend the platform provides (e.g. Ascend's graph compiler); the passes already ran."""
    compile_fn = current_platform.compile_backend(backend)
    if compile_fn is None:
        known = ", ".join(("eager", "inductor", *current_platform.extra_compile_backends))
        raise ValueError(f"unknown compile backend {backend!r} on platform {current_platform.name} (known: {known})")
    return compile_fn(gm, example_inputs)


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
    example = fake_args if size is None else concrete_inputs(fake_args, size)
    if backend != "inductor":
        return _platform_compile(backend, transform(), example)
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
