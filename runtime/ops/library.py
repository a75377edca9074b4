"""``graph_op``: define one of our ops from a type-hinted Python function, straight on the dispatcher.

Why not ``torch.library.custom_op``: its per-call Python layer (a frame that turns Dynamo off and
back on, a check that no output aliases an input) is host time paid at every call. Same process,
same kernel, H200 host: 92 -> 82, 92 -> 86 and 55 -> 52 us per call of the fused RMSNorm (the
kernel function alone: 42-72 us; docs/perf.md, 2026-12-01 evening). Small, but a decode step
without static graphs calls our ops ~150 times, and in piecewise graphs the attention op runs
between the captured pieces at every step. Here the function is registered as the op's
``CompositeExplicitAutograd`` kernel as it is; what that leaves out is nothing we rely on:

- Dynamo never traces into the kernel: a compiled graph calls our ops through ``torch.ops`` from
  inside the backend's compiled function, which runs with Dynamo off already.
- The schema is inferred from the type hints exactly as ``custom_op`` infers it, so mutated
  arguments are annotated (``Tensor(a0!) out``) and functionalization still sees the mutation.
- No autograd formula: these are inference ops (as they were before).
- No alias check: a kernel (a platform's too) must return new tensors, as its fake kernel promises.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch


class GraphOp:
    """An op defined by :func:`graph_op`: call it like the function (through the dispatcher, as
    ``torch.ops.<namespace>.<name>`` does) and give it a fake kernel with ``register_fake``."""

    def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
        namespace, name = qualname.split("::")
        self.qualname = qualname
        self._packet = getattr(getattr(torch.ops, namespace), name)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._packet(*args, **kwargs)

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        """The shape/dtype-only kernel Dynamo and AOTAutograd trace with (decorator)."""
        torch.library.register_fake(self.qualname, fake)
        return fake


def graph_op(qualname: str, *, mutates_args: Sequence[str] = ()) -> Callable[[Callable[..., Any]], GraphOp]:
    """Decorator: define ``qualname`` ("namespace::name") with the function's schema and register the
    function as its kernel for every device."""
    def define(fn: Callable[..., Any]) -> GraphOp:
        schema = torch.library.infer_schema(fn, mutates_args=tuple(mutates_args))
        torch.library.define(qualname, schema)
        torch.library.impl(qualname, "CompositeExplicitAutograd", fn)
        return GraphOp(qualname, fn)
    return define
