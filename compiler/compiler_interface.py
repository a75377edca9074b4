"""Compile backends as objects: what each does with a piece and what it can do, decided once.

``make_compiler(name)`` turns the configured backend name into one of these when a model is
decorated; the backend, the compile cache and the default passes then ask the object (can it cache
artefacts? specialise per size? does it fuse elementwise code itself?) instead of comparing names.
vLLM's ``CompilerInterface`` is the model.
"""
from __future__ import annotations

import abc
from typing import Any, Callable

import torch

from runtime.platforms import current_platform


class CompilerInterface(abc.ABC):
    name: str
    supports_cache = False  # artefacts can be saved and loaded across processes (compiler/cache.py)
    compiles_per_size = False  # ``compile_sizes`` get size-specialised compiles
    fuses_elementwise = False  # generates its own fused kernels: the default passes skip our fusions

    @abc.abstractmethod
    def compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any], size: int | None) -> Any:
        """The compiled artefact of ``gm``; ``size`` None: the dynamic-shape compile (inputs carry
        Dynamo's symbols), else one for concrete inputs of that token count."""

    def callable_for(self, gm: torch.fx.GraphModule, artifact: Any) -> Callable:
        """What the split module calls for ``gm``: the artefact, compiled now or loaded from the cache."""
        return artifact


class EagerCompiler(CompilerInterface):
    """Runs the (pass-transformed) FX graph as Python: for tests, debugging and fast start-up."""
    name = "eager"

    def compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any], size: int | None) -> Any:
        return gm


class InductorCompiler(CompilerInterface):
    name = "inductor"
    supports_cache = compiles_per_size = fuses_elementwise = True

    def compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any], size: int | None) -> Callable:
        # The dynamic compile takes its symbols from Dynamo's tracing context (we run inside the backend
        # call); a per-size compile gets concrete example inputs.
        shapes = "from_example_inputs" if size is not None else "from_tracing_context"
        if size is not None:
            gm = torch.fx.GraphModule(gm, gm.graph)  # standalone_compile rewrites the graph it is given
        return torch._inductor.standalone_compile(gm, example_inputs, dynamic_shapes=shapes)

    def callable_for(self, gm: torch.fx.GraphModule, artifact: Any) -> Callable:
        return _unwrap_single(gm, artifact)


class PlatformCompiler(CompilerInterface):
    """A compile backend the platform provides (``Platform.compile_backend``)."""

    def __init__(self, name: str, compile_fn: Callable[[torch.fx.GraphModule, list[Any]], Callable]) -> None:
        self.name, self._compile_fn = name, compile_fn

    def compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any], size: int | None) -> Any:
        return self._compile_fn(gm, example_inputs)

    def callable_for(self, gm: torch.fx.GraphModule, artifact: Any) -> Callable:
        return _unwrap_single(gm, artifact)


def make_compiler(name: str) -> CompilerInterface:
    if name == "eager":
        return EagerCompiler()
    if name == "inductor":
        return InductorCompiler()
    compile_fn = current_platform.compile_backend(name)
    if compile_fn is None:
        known = ", ".join(("eager", "inductor", *current_platform.extra_compile_backends))
        raise ValueError(f"unknown compile backend {name!r} on platform {current_platform.name} (known: {known})")
    return PlatformCompiler(name, compile_fn)


def _unwrap_single(gm: torch.fx.GraphModule, fn: Callable) -> Callable:
    """Compiled artefacts (a loaded Inductor one, a platform compiler's) may return a sequence where the
    graph returns one bare value; the split module expects the bare value."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if isinstance(output.args[0], (tuple, list)):
        return fn

    def call(*args: Any) -> Any:
        out = fn(*args)
        return out[0] if isinstance(out, (list, tuple)) else out

    return call
