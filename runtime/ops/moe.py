"""``graphmode::fused_moe``: the expert computation of a sparse MoE block as one opaque op.

Opaque to Dynamo because routing has data-dependent shapes. The reference kernel groups the
(token, expert) assignments by expert and runs every expert at once with two batched matmuls,
so there is no Python loop over experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.ops.library import graph_op

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
    return hidden.new_zeros(num_tokens, hidden_size).index_add_(0, token_of, weighted)


@graph_op(FUSED_MOE_OP, mutates_args=())
def fused_moe(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    return fused_moe_reference(hidden, w13, w2, topk_weights, topk_ids)


@fused_moe.register_fake
def _fused_moe_fake(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    return torch.empty_like(hidden)
