"""``graphmode::fused_moe``: the expert computation of a sparse MoE block as one opaque op.

Opaque to Dynamo because routing has data-dependent shapes. The reference kernel groups the
(token, expert) assignments by expert and runs every expert at once with two batched matmuls padded to
the largest group, so there is no Python loop over experts; sizing that padding reads the group sizes on
the host. Where the platform has a grouped GEMM (``Platform.has_grouped_gemm``: CUDA Hopper and later,
bf16), ``fused_moe_grouped`` runs instead: the (token, expert) pairs sorted by expert into one
[T*k, H] block and ``torch._grouped_mm`` with the group ends read on the device. Every shape is fixed by
T and k, so nothing syncs with the host and the MoE layers capture in device graphs.
``GRAPHMODE_OP_KERNELS=fused_moe=torch`` keeps the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.ops.kernels import reference_asked_for
from runtime.ops.library import graph_op
from runtime.platforms import current_platform

FUSED_MOE_OP = "graphmode::fused_moe"


def fused_moe_reference(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """hidden [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; topk_* [T, k].

    An id of -1 marks a (token, expert) pair this rank does not own (expert parallelism): skipped."""
    num_tokens, hidden_size = hidden.shape
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).long()
    pair_of = (flat_ids >= 0).nonzero().squeeze(1)
    flat_ids = flat_ids[pair_of]
    order = flat_ids.argsort(stable=True)
    sorted_ids = flat_ids[order]
    counts = torch.bincount(flat_ids, minlength=num_experts)
    # Group size bounds the padded batch; one host sync, acceptable outside captured graphs.
    capacity = int(counts.max()) if flat_ids.numel() else 0
    group_start = counts.cumsum(0) - counts
    slot_in_group = torch.arange(flat_ids.numel(), device=hidden.device) - group_start[sorted_ids]
    order = pair_of[order]  # back to indices into the flat (token, k) pairs
    token_of = order // top_k
    grouped = hidden.new_zeros(num_experts, capacity, hidden_size)
    grouped[sorted_ids, slot_in_group] = hidden[token_of]
    gate_up = torch.bmm(grouped, w13.transpose(1, 2))
    gate, up = gate_up.chunk(2, dim=-1)
    expert_out = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))
    weighted = expert_out[sorted_ids, slot_in_group] * topk_weights.reshape(-1)[order, None].to(hidden.dtype)
    return combine(weighted, order, num_tokens, top_k)


def fused_moe_grouped(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """``fused_moe_reference``'s result with static shapes only: every (token, expert) pair sorted by expert
    (skipped pairs, id -1, last), two grouped GEMMs over the groups' end offsets, the weighted rows summed
    back per token."""
    num_tokens = hidden.shape[0]
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).long()
    owned = flat_ids >= 0
    key = torch.where(owned, flat_ids, num_experts)  # a pair this rank does not own sorts after every group
    order = key.argsort(stable=True)
    # Group sizes by a scatter (bincount's length would depend on the values): no host sync.
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=hidden.device)
    counts.index_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    ends = counts[:num_experts].cumsum(0, dtype=torch.int32)
    token_of = order // top_k
    rows = hidden[token_of]
    gate_up = torch._grouped_mm(rows, w13.transpose(1, 2), offs=ends)
    gate, up = gate_up.chunk(2, dim=-1)
    expert_out = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=ends)
    weights = topk_weights.reshape(-1)[order, None].to(hidden.dtype)
    # Rows past the last group (skipped pairs) are left unwritten by the GEMM: select, never multiply, them away.
    weighted = torch.where(owned[order, None], expert_out * weights, 0)
    return combine(weighted, order, num_tokens, top_k)


def combine(weighted: torch.Tensor, pair_index: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """Each token's weighted expert rows (row i is flat (token, k) pair ``pair_index[i]``) summed in fp32 in
    a fixed order. Not ``index_add_``: on a GPU it adds with atomics in the order they land, rounding each
    partial sum to bf16, so the same inputs gave different bits from call to call and from a graph replay
    to the eager call (greedy tokens of a random MoE model changed with it)."""
    pairs = weighted.new_zeros(num_tokens * top_k, weighted.shape[1])
    pairs[pair_index] = weighted  # every pair at most once: no accumulation, no order
    return pairs.view(num_tokens, top_k, weighted.shape[1]).sum(1, dtype=torch.float32).to(weighted.dtype)


def grouped_gemm_fits(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """The grouped GEMM takes these operands: 16-byte aligned rows of every matrix it reads."""
    itemsize = hidden.element_size()
    return all((size * itemsize) % 16 == 0 for size in (hidden.shape[1], w13.shape[1], w2.shape[2]))


@graph_op(FUSED_MOE_OP, mutates_args=())
def fused_moe(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    if (current_platform.has_grouped_gemm(hidden.dtype) and grouped_gemm_fits(hidden, w13, w2)
            and not reference_asked_for(FUSED_MOE_OP)):
        return fused_moe_grouped(hidden, w13, w2, topk_weights, topk_ids)
    return fused_moe_reference(hidden, w13, w2, topk_weights, topk_ids)


@fused_moe.register_fake
def _fused_moe_fake(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    return torch.empty_like(hidden)
