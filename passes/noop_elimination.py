"""Clean-up: remove ops that return their input unchanged.

Graphs here are not functionalized (the attention op writes its ``out``), so the pass is
conservative and decides from the nodes' fake values (``meta["val"]``), never from op arguments:

* a view op (view, reshape, slice, expand, ...) whose result has its input's shape, strides,
  offset, dtype and device is the input itself: always safe to drop;
* a copy (``_to_copy`` to the same dtype/device/layout, ``clone``) is dropped only when neither
  tensor's storage is written by any op in the graph, the copy would not turn a graph input into
  a graph output, and (for clone) the input has no other users.

Nodes without fake values are left alone.
"""
from __future__ import annotations

import operator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.multiprocessing.reductions import StorageWeakRef

from passes.base import GraphPass, register_pass

aten = torch.ops.aten

_VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.slice.Tensor, aten.expand.default,
    aten.alias.default, aten.detach.default, aten.permute.default, aten.transpose.int, aten.squeeze.dim,
    aten.squeeze.dims, aten.as_strided.default,
}
_COPY_OPS = {aten._to_copy.default, aten.clone.default}
# Keyword arguments of _to_copy that may be present without changing the result.
_HARMLESS_COPY_KWARGS = {"dtype", "device", "layout", "non_blocking", "memory_format", "pin_memory"}


def _val(node: torch.fx.node.Argument) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _storage(node: torch.fx.Node) -> StorageWeakRef | None:
    val = _val(node)
    return StorageWeakRef(val.untyped_storage()) if val is not None else None


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def same_meta(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Same shape, strides, offset, dtype and device (statically, for symbolic sizes)."""
    va, vb = _val(a), _val(b)
    if va is None or vb is None or va.dtype != vb.dtype or va.device != vb.device or va.layout != vb.layout:
        return False
    # A copy of a conjugate/negative view materialises it: not a no-op.
    if va.is_conj() != vb.is_conj() or va.is_neg() != vb.is_neg():
        return False
    return (_equal(va.shape, vb.shape) and _equal(va.stride(), vb.stride())
            and statically_known_true(va.storage_offset() == vb.storage_offset()))


def _written_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensors a node may write to: schema-declared mutations, or every tensor argument of an
    unknown Python callable."""
    if node.op != "call_function" or node.target is operator.getitem:
        return []
    args = node.all_input_nodes
    if isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        if not schema.is_mutable:
            return []
        written = []
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += _flat_nodes(value)
        for name, value in node.kwargs.items():
            arg = next((a for a in schema.arguments if a.name == name), None)
            if arg is not None and arg.alias_info is not None and arg.alias_info.is_write:
                written += _flat_nodes(value)
        return written
    # SymInt arithmetic and other non-tensor helpers read sizes only.
    return [n for n in args if _val(n) is not None]


def _flat_nodes(value) -> list[torch.fx.Node]:
    nodes: list[torch.fx.Node] = []
    torch.fx.node.map_arg(value, nodes.append)
    return nodes


def _written_storages(graph: torch.fx.Graph) -> set[StorageWeakRef]:
    storages = set()
    for node in graph.nodes:
        for written in _written_args(node):
            storage = _storage(written)
            if storage is not None:
                storages.add(storage)
    return storages


def eliminate_noops(graph: torch.fx.Graph) -> int:
    """Remove no-op views and unobservable copies from ``graph``; returns how many were removed."""
    written = _written_storages(graph)
    outputs = set(_flat_nodes(graph.find_nodes(op="output")[0].args))
    inputs = set(graph.find_nodes(op="placeholder"))
    removed = 0
    for node in list(graph.nodes):
        src = node.args[0] if node.op == "call_function" and node.args else None
        if not isinstance(src, torch.fx.Node) or not same_meta(node, src):
            continue
        # Returning an input (or another output) itself instead of a view or copy of it changes
        # what aliases what for the caller.
        if node in outputs and (src in inputs or src in outputs):
            continue
        if node.target in _VIEW_OPS or (node.target in _COPY_OPS and _copy_removable(node, src, written)):
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            removed += 1
    return removed


def _copy_removable(node: torch.fx.Node, src: torch.fx.Node, written: set[StorageWeakRef]) -> bool:
    if set(node.kwargs) - _HARMLESS_COPY_KWARGS or len(node.args) != 1:
        return False
    if node.target is aten.clone.default and len(src.users) != 1:
        return False
    return _storage(node) not in written and _storage(src) not in written


@register_pass
class NoopEliminationPass(GraphPass):
    """Drop same-shape views, full slices, same-dtype casts and unobservable clones."""

    name = "noop_elimination"

    def __call__(self, graph: torch.fx.Graph) -> int:
        return eliminate_noops(graph)
