"""Graph passes over the ATen-level FX graphs of the compiler's pieces, and the manager that runs them.

Graph level: each piece is traced with ``make_fx(piece, tracing_mode="symbolic" | "fake")``, not
functionalized and not decomposed, so nodes carry ``meta["val"]`` fake tensors and ops are ATen
overloads (``aten.rsqrt.default``, ``aten._to_copy.default``, ...). Only the token dim should be
symbolic; weights and buffers (the rotary table) must have static shapes.

Matching approach: fusion patterns are plain Python functions that repeat the model code
(models/layers.py), traced per dtype by ``torch._inductor.pattern_matcher.register_replacement``
with a no-decomposition ``fwd_only`` trace and applied by a ``PatternMatcherPass``. Chosen over
``torch.fx.subgraph_rewriter`` because it (a) matches ATen graphs made by make_fx directly, shape
and scalar literals ignored in the first match and then re-checked by retracing the pattern with
the matched nodes' real (symbolic) shapes and dtypes, so one registration covers every hidden size
and token count; (b) supports multi-output patterns (``fused_add_rms_norm`` returns the normalised
row and the new residual); (c) refuses matches whose inner nodes have users outside the pattern or
that cross a mutation (the attention op mutates its ``out``). Before matching, every pattern pass
drops dead nodes (a stray ``detach`` counts as a user) and no-op views (``eliminate_noops``, the
same canonical form the patterns are traced in), so fusions work in any order. See passes/patterns.py.

Weights and buffers must have static shapes: with every dim symbolic (make_fx "symbolic" on real
parameters passed as inputs), split sizes become SymInt expressions of the weight's size and the
SwiGLU pattern no longer matches. Trace with Dynamo's fake example inputs (``tracing_mode="fake"``)
or with parameters as module constants.

Usage (the compiler)::

    pm = PassManager.from_names(config.passes)  # "default": default_pass_names()
    gm = pm(gm)        # pm.match_counts: {pass name: matches}
    key = pm.uuid()    # part of the compile-cache key
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Iterable

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

# Importing the pass modules fills the registry.
import passes.fuse_add_rms_norm  # noqa: F401
import passes.fuse_qk_norm_rotary  # noqa: F401
import passes.fuse_rotary  # noqa: F401
import passes.fuse_silu_mul  # noqa: F401
import passes.fuse_norm_linear  # noqa: F401  (after the norm and SwiGLU fusions it builds on)
import passes.noop_elimination  # noqa: F401
from passes.base import PASSES, GraphPass, register_pass

__all__ = ["GraphPass", "PASSES", "OPT_IN_PASSES", "register_pass", "PassManager", "PassVerificationError",
           "default_pass_names"]

logger = logging.getLogger(__name__)


# Registered and tested, but named explicitly to run: their kernels are not yet timed on a GPU.
OPT_IN_PASSES = ("fuse_norm_linear",)


def default_pass_names(backend_fuses: bool = False) -> list[str]:
    """Clean-up first (patterns are matched on canonical graphs), then the fusions.

    qk-norm+rotary before rotary and the plain norm, add+norm before the plain norm: the longer
    pattern must win where patterns overlap. A compile backend that generates its own fused kernels
    (``backend_fuses``: Inductor) gets only the clean-up: our fusions would hide elementwise chains
    from it (docs/perf.md, H100: 9.6 -> 14.3 ms per decode step without graphs, 2.31 -> 2.60 ms with).
    """
    if backend_fuses:
        return ["noop_elimination"]
    return ["noop_elimination", "fuse_qk_norm_rotary", "fuse_rotary", "fuse_add_rms_norm", "fuse_rms_norm",
            "fuse_silu_mul"]


class PassVerificationError(RuntimeError):
    """A pass left an invalid graph (lint failure, or outputs whose shape or dtype changed)."""


class PassManager:
    """Runs passes in order over GraphModules; counts matches over every call."""

    def __init__(self, passes: Iterable[GraphPass], verify: bool = False, record: bool = False) -> None:
        self.passes = list(passes)
        self.verify = verify
        self.record = record
        self.match_counts: Counter[str] = Counter()
        self.graphs_after: dict[str, str] = {}

    @classmethod
    def from_names(cls, names: Iterable[str], verify: bool = False, record: bool = False,
                   backend_fuses: bool = False) -> "PassManager":
        """``"default"`` expands to :func:`default_pass_names` (which depends on ``backend_fuses``)."""
        expanded: list[str] = []
        for name in names:
            expanded.extend(default_pass_names(backend_fuses) if name == "default" else [name])
        unknown = [name for name in expanded if name not in PASSES]
        if unknown:
            raise ValueError(f"unknown graph pass(es) {unknown}; known: {sorted(PASSES)} (or 'default')")
        return cls([PASSES[name]() for name in expanded], verify=verify, record=record)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def uuid(self) -> str:
        digest = hashlib.sha256(torch.__version__.encode())
        for graph_pass in self.passes:
            digest.update(f"{graph_pass.name}:{graph_pass.uuid()};".encode())
        return digest.hexdigest()

    def __call__(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for graph_pass in self.passes:
            before = _output_signature(gm.graph) if self.verify else None
            count = graph_pass(gm.graph)
            self.match_counts[graph_pass.name] += count
            logger.debug("pass %s: %d match(es)", graph_pass.name, count)
            if self.verify:
                _verify(gm, graph_pass.name, before)
            if self.record:
                gm.recompile()
                self.graphs_after[self._record_key(graph_pass.name)] = gm.code
        gm.recompile()
        return gm

    def _record_key(self, name: str) -> str:
        # A pass listed twice keeps both snapshots.
        key, n = name, 1
        while key in self.graphs_after:
            n += 1
            key = f"{name}#{n}"
        return key


def _output_signature(graph: torch.fx.Graph) -> list[tuple | None]:
    """(shape, dtype) of every tensor the graph returns, from the nodes' fake values."""
    output = graph.find_nodes(op="output")[0]
    signature = []
    for arg in _flat(output.args[0]):
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        signature.append((tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None)
    return signature


def _flat(args) -> list:
    flat: list = []
    torch.fx.node.map_aggregate(args, flat.append)
    return flat


def _verify(gm: torch.fx.GraphModule, pass_name: str, before: list[tuple | None]) -> None:
    try:
        gm.graph.lint()
        gm.recompile()
        _propagate_fake_values(gm)
    except Exception as e:  # any failure here is the pass's fault; say which pass
        raise PassVerificationError(f"graph invalid after pass {pass_name!r}: {e}") from e
    after = _output_signature(gm.graph)
    if len(after) != len(before) or not all(_same_signature(a, b) for a, b in zip(after, before)):
        raise PassVerificationError(f"pass {pass_name!r} changed the graph outputs from {before} to {after}")


def _same_signature(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return a is b
    (shape_a, dtype_a), (shape_b, dtype_b) = a, b
    return (dtype_a == dtype_b and len(shape_a) == len(shape_b)
            and all(statically_known_true(x == y) for x, y in zip(shape_a, shape_b)))


def _propagate_fake_values(gm: torch.fx.GraphModule) -> None:
    """Re-run shape propagation from the placeholders' fake values (rewrites every node's meta val)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    inputs = [node.meta.get("val") for node in placeholders]
    fake_mode = torch._guards.detect_fake_mode(inputs)
    if fake_mode is None:
        raise PassVerificationError("verify needs meta['val'] fake tensors on the placeholders")
    _ConstantsAsFake(gm, fake_mode).propagate_dont_convert_inputs(*inputs)


class _ConstantsAsFake(FakeTensorProp):
    """FakeTensorProp that also fakes real tensors held by the module (``get_attr`` constants)."""

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return self._mode.from_tensor(value, static_shapes=True)
        return value

