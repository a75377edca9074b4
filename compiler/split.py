"""Splitting a Dynamo graph at the splitting ops (attention by default) into pieces.

Every splitting-op call becomes a piece of its own; the runs of nodes between them become the
pieces that get compiled (and later captured). ``torch.fx.passes.split_module`` does the cutting
and threads the values that cross piece boundaries through as piece inputs and outputs.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx.passes.split_module import split_module


@dataclass
class Piece:
    name: str  # attribute name on the split module ("submod_0", ...)
    index: int
    is_splitting_op: bool
    module: torch.fx.GraphModule

    def op_counts(self) -> dict[str, int]:
        return graph_op_counts(self.module)


def graph_op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many times each op is called in ``gm`` (by ``node_target_name``)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            key = node_target_name(node)
            counts[key] = counts.get(key, 0) + 1
    return counts


def node_target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._opname}" + ("" if target._overloadname == "default"
                                                          else f".{target._overloadname}")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if node.op == "call_method":
        return f"Tensor.{target}"
    if node.op == "call_module":
        return str(target)
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def is_splitting_node(node: torch.fx.Node, splitting_ops: list[str]) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = node_target_name(node).split(".")[0]
        return name in splitting_ops
    return False


def split_graph(gm: torch.fx.GraphModule, splitting_ops: list[str]) -> tuple[torch.fx.GraphModule, list[Piece]]:
    """Cut ``gm`` before and after each splitting op. With no splitting ops, one piece."""
    partition: dict[torch.fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_splitting_node(node, splitting_ops):
            current += 1
            partition[node] = current
            current += 1
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in partition \
                and partition[node.args[0]] == current - 1 and is_splitting_node(node.args[0], splitting_ops):
            partition[node] = current - 1  # unpacking a splitting op's tuple stays with it
        else:
            partition[node] = current
    split_gm = split_module(gm, gm, lambda node: partition[node], keep_original_order=True)
    pieces = []
    split_ids = {partition[n] for n in partition if is_splitting_node(n, splitting_ops)}
    for name, module in split_gm.named_children():
        index = int(name.removeprefix("submod_"))
        pieces.append(Piece(name, index, index in split_ids, module))
    pieces.sort(key=lambda p: p.index)
    return split_gm, pieces
