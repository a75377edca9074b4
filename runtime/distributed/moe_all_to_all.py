"""Expert parallelism by all-to-all: ``graphmode::moe_all_to_all``.

Attention is tensor-parallel, so every rank holds every token. The all-reduce combine
(``expert_parallel_comm="all_reduce"``, models/qwen3_moe.py) lets each rank run its own experts on every
token and sums the partial outputs. This op is the other shape, vLLM's modular MoE (prepare ->
experts -> finalize) over ``all_to_all_single``:

- prepare (dispatch): the tokens are split into one chunk per rank; a rank sends each (token, expert)
  pair of its chunk to the rank that owns the expert, the pair counts exchanged first so every
  receiver sizes its buffer;
- experts: the owner runs ``graphmode::fused_moe`` on what it received, one expert per row;
- finalize (combine): the results go back the way they came, the origin folds in the top-k weights,
  and an all-gather gives every rank every token again.

Under data parallelism (``tokens_shared=False``) each rank holds its own tokens instead: it dispatches all
of them and the combine ends with its own rows back, no all-gather.

Each collective is a DBO yield point ("moe_dispatch", "moe_combine", "moe_gather"). The counts
exchange reads sizes on the host, so the op cannot be captured in a device graph: a graph mode that
captures it falls back (one log line) and ``expert_parallel_comm="all_reduce"`` is the choice for graphs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

import runtime.ops.moe  # noqa: F401  (registers graphmode::fused_moe, the experts)
from runtime.ops.library import graph_op
from runtime.ubatching import run_collective

MOE_ALL_TO_ALL_OP = "graphmode::moe_all_to_all"


def _exchange(out: torch.Tensor, x: torch.Tensor, out_sizes: list[int] | None, in_sizes: list[int] | None, group,
              label: str) -> torch.Tensor:
    run_collective(label, lambda: dist.all_to_all_single(out, x, out_sizes, in_sizes, group=group, async_op=True))
    return out


def _chunk(num_tokens: int, world: int) -> list[int]:
    """Tokens per rank: even, the first ``num_tokens % world`` ranks one more."""
    return [num_tokens // world + (r < num_tokens % world) for r in range(world)]


def dispatch(hidden: torch.Tensor, topk_ids: torch.Tensor, expert_starts: list[int], group, rank: int,
             tokens_shared: bool = True):
    """This rank's chunk of (token, expert) pairs (all its tokens when they are its own) sent to the experts'
    owners. Returns the rows and local expert ids received, and what the combine needs: the pair order, the
    sizes each way."""
    world = len(expert_starts)
    sizes = _chunk(hidden.shape[0], world) if tokens_shared else None
    lo = sum(sizes[:rank]) if tokens_shared else 0
    count = sizes[rank] if tokens_shared else hidden.shape[0]
    ids = topk_ids[lo: lo + count].reshape(-1).long()
    starts = torch.tensor(expert_starts, device=ids.device)
    owner = torch.searchsorted(starts, ids, right=True) - 1
    order = owner.argsort(stable=True)
    send_counts = torch.bincount(owner, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    _exchange(recv_counts, send_counts, None, None, group, "moe_dispatch")
    send_sizes, recv_sizes = send_counts.tolist(), recv_counts.tolist()  # the host sync: buffer sizes
    token_of = order // topk_ids.shape[1] + lo
    rows = hidden.new_empty(sum(recv_sizes), hidden.shape[1])
    _exchange(rows, hidden[token_of], recv_sizes, send_sizes, group, "moe_dispatch")
    local_ids = ids.new_empty(sum(recv_sizes))
    _exchange(local_ids, (ids - starts[owner])[order], recv_sizes, send_sizes, group, "moe_dispatch")
    return rows, local_ids, (order, token_of, send_sizes, recv_sizes, sizes, lo, count)


def combine(expert_out: torch.Tensor, topk_weights: torch.Tensor, plan, group, rank: int) -> torch.Tensor:
    """The experts' rows back to their origin, weighted and summed per token, then (shared tokens) every
    chunk to every rank."""
    order, token_of, send_sizes, recv_sizes, sizes, lo, count = plan
    back = expert_out.new_empty(sum(send_sizes), expert_out.shape[1])
    _exchange(back, expert_out, send_sizes, recv_sizes, group, "moe_combine")
    weights = topk_weights[lo: lo + count].reshape(-1)[order, None].to(back.dtype)
    width = max(sizes) if sizes is not None else count
    mine = back.new_zeros(width, back.shape[1]).index_add_(0, token_of - lo, back * weights)
    if sizes is None:  # the rank's own tokens: nothing to share
        return mine
    gathered = [torch.empty_like(mine) for _ in sizes]
    run_collective("moe_gather", lambda: dist.all_gather(gathered, mine, group=group, async_op=True))
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


@graph_op(MOE_ALL_TO_ALL_OP, mutates_args=())
def moe_all_to_all(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, expert_starts: list[int], group_name: str,
                   tokens_shared: bool = True) -> torch.Tensor:
    """hidden [T, H] (every token, as on every rank; this rank's own under data parallelism:
    ``tokens_shared=False``); topk_* [T, k] with global expert ids; w13/w2 this rank's experts, which start at
    ``expert_starts[rank]``. Returns the MoE output [T, H] of ``hidden``'s tokens."""
    group = _resolve_process_group(group_name)
    rank = dist.get_rank(group)
    rows, local_ids, plan = dispatch(hidden, topk_ids, expert_starts, group, rank, tokens_shared)
    ones = rows.new_ones(rows.shape[0], 1)
    expert_out = torch.ops.graphmode.fused_moe(rows, w13, w2, ones, local_ids[:, None])
    return combine(expert_out, topk_weights, plan, group, rank)


@moe_all_to_all.register_fake
def _moe_all_to_all_fake(hidden, w13, w2, topk_weights, topk_ids, expert_starts, group_name,
                         tokens_shared=True) -> torch.Tensor:
    return torch.empty_like(hidden)
