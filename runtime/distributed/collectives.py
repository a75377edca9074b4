"""Communication as custom ops: ``graphmode::all_reduce`` and ``graphmode::all_gather``.

Registered with torch.library so Dynamo sees one opaque node per collective (the fake impls say
what it writes), and the compiler can split a graph at them when ``splitting_ops`` lists them.
Like the attention op they write into an ``out`` buffer the caller allocated, so in piecewise
graphs the buffer comes from the preceding piece and keeps its address.

Every collective is launched asynchronously and handed to ``runtime.ubatching.run_collective``,
which waits on it (and, under dual-batch overlap, lets the other micro-batch run meanwhile).
The all-reduce serves both tensor parallelism ("tp_all_reduce") and the expert-parallel MoE
combine ("moe_combine"): the label names the yield point. On one rank ``simulated_collective``
stands in for the all-reduce (``simulate_collective_us``): same place, same yield point, a device
held for a set time instead of data moved.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from runtime.distributed.parallel_state import ParallelContext
from runtime.ops.library import graph_op
from runtime.platforms import current_platform
from runtime.ubatching import run_collective

ALL_REDUCE_OP = "graphmode::all_reduce"
ALL_GATHER_OP = "graphmode::all_gather"
SIMULATED_COLLECTIVE_OP = "graphmode::simulated_collective"


@graph_op(ALL_REDUCE_OP, mutates_args=("out",))
def all_reduce(x: torch.Tensor, out: torch.Tensor, group_name: str, label: str) -> None:
    """out = sum of ``x`` over the group's ranks."""
    out.copy_(x)
    group = _resolve_process_group(group_name)
    run_collective(label, lambda: dist.all_reduce(out, group=group, async_op=True))


@all_reduce.register_fake
def _all_reduce_fake(x, out, group_name, label) -> None:
    return None


@graph_op(ALL_GATHER_OP, mutates_args=("out",))
def all_gather(x: torch.Tensor, out: torch.Tensor, group_name: str, label: str) -> None:
    """out [world, *x.shape]: out[r] = rank r's ``x``."""
    group = _resolve_process_group(group_name)
    parts = list(out.unbind(0))
    run_collective(label, lambda: dist.all_gather(parts, x.contiguous(), group=group, async_op=True))


@all_gather.register_fake
def _all_gather_fake(x, out, group_name, label) -> None:
    return None


@graph_op(SIMULATED_COLLECTIVE_OP, mutates_args=("out",))
def simulated_collective(x: torch.Tensor, out: torch.Tensor, microseconds: float, label: str) -> None:
    """out = ``x``, after holding the device for ``microseconds`` on the platform's communication stream,
    where an all-reduce of ``x`` would run: a collective's timing and its yield point without a second rank."""
    out.copy_(x)
    run_collective(label, lambda: current_platform.simulated_collective(microseconds))


@simulated_collective.register_fake
def _simulated_collective_fake(x, out, microseconds, label) -> None:
    return None


def reduce_across(x: torch.Tensor, parallel: ParallelContext, label: str = "tp_all_reduce") -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group (identity on one rank, or a simulated collective)."""
    if not parallel.is_parallel:
        if not parallel.simulate_collective_us:
            return x
        out = torch.empty_like(x)
        torch.ops.graphmode.simulated_collective(x, out, parallel.simulate_collective_us, label)
        return out
    out = torch.empty_like(x)
    torch.ops.graphmode.all_reduce(x, out, parallel.group_name, label)
    return out


def gather_last_dim(x: torch.Tensor, parallel: ParallelContext, label: str = "tp_all_gather") -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dim (identity on one rank)."""
    if not parallel.is_parallel:
        return x
    out = torch.empty((parallel.world_size, *x.shape), dtype=x.dtype, device=x.device)
    torch.ops.graphmode.all_gather(x, out, parallel.group_name, label)
    return torch.cat(out.unbind(0), dim=-1)
