"""Compiling one piece with the configured compiler (compiler/compiler_interface.py), through the
compile cache where the compiler's artefacts can be cached."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from compiler.cache import CompileCache
from compiler.compiler_interface import CompilerInterface
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


def compile_piece(piece: torch.fx.GraphModule, fake_args: list[Any], compiler: CompilerInterface,
                  cache: CompileCache | None, size: int | None = None,
                  transform: Callable[[], torch.fx.GraphModule] | None = None) -> Callable:
    """A callable for ``piece``; ``size`` None means the dynamic-shape compile.

    ``transform`` produces the graph to compile (the piece after passes). The cache key is taken
    from the untransformed piece (the pass pipeline is part of the global key), so a cache hit
    skips the passes as well as the compiler.
    """
    transform = transform or (lambda: piece)
    counters.backend_compilations += 1
    example = fake_args if size is None else concrete_inputs(fake_args, size)
    key = cache.key_for(piece, example, size) if cache is not None else None
    if key is not None:
        # Pieces of identical code and inputs (a model's middle layers) share one artefact: compiled or
        # loaded once per process, not once per layer.
        artifact = cache.in_memory.get(key)
        if artifact is not None:
            counters.cache_hits += 1
            return compiler.callable_for(piece, artifact)
        artifact = cache.load(key)
        if artifact is not None:
            counters.cache_hits += 1
            cache.in_memory[key] = artifact
            return compiler.callable_for(piece, artifact)
        counters.cache_misses += 1
    artifact = compiler.compile(transform(), example, size)
    if key is not None:
        cache.save(key, artifact)
        cache.in_memory[key] = artifact
    return compiler.callable_for(piece, artifact)
