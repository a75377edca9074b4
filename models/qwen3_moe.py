"""Qwen3-MoE: the Qwen3 decoder with sparse top-k expert MLPs in (most) layers."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import runtime.distributed.moe_all_to_all  # noqa: F401  (registers graphmode::moe_all_to_all)
import runtime.ops.moe  # noqa: F401  (registers graphmode::fused_moe)
from models.layers import GatedMLP
from models.parallel_layers import Shard, even_shard
from runtime.distributed.collectives import reduce_across
from runtime.distributed.parallel_state import current_parallel
from models.llama import Qwen3ForCausalLM


class SparseMoeBlock(nn.Module):
    """Router + stacked experts; the expert math is the opaque ``graphmode::fused_moe`` op.

    Under tensor parallelism every rank holds every expert's slice of the intermediate dim; under
    expert parallelism each rank holds whole experts (``num_local_experts`` from
    ``expert_start``). Either way a rank's output is a partial sum and one all-reduce combines it.
    Expert parallelism needs no dispatch communication here: attention is tensor-parallel, so
    every rank already holds every token, and a rank just runs the (token, expert) pairs whose
    expert it owns (the others are marked -1 for the op to skip). Experts split over data-parallel
    ranks, each with its own tokens, travel by ``graphmode::moe_all_to_all`` instead.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.parallel = parallel = current_parallel()
        self.num_experts = num_experts
        if parallel.expert_parallel:
            ep_rank, ep_size, _ = parallel.expert_group
            if num_experts < ep_size:
                raise ValueError(f"expert parallelism over {ep_size} ranks needs at least as many "
                                 f"experts, the model has {num_experts}")
            experts = even_shard(num_experts, ep_rank, ep_size)
            self.inter = Shard(intermediate_size, 0, intermediate_size)
            self.expert_starts = [even_shard(num_experts, r, ep_size).start for r in range(ep_size)]
        else:
            experts = Shard(num_experts, 0, num_experts)
            self.inter = even_shard(intermediate_size, parallel.rank, parallel.world_size)
            self.expert_starts = [0]
        self.expert_start, self.num_local_experts = experts.start, experts.count
        # Data-parallel ranks hold different tokens: only the all-to-all brings them to their experts.
        self.all_to_all = parallel.expert_parallel and (parallel.expert_comm == "all_to_all"
                                                        or not parallel.tokens_shared)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(experts.count, 2 * self.inter.count, hidden_size))
        self.w2 = nn.Parameter(torch.empty(experts.count, hidden_size, self.inter.count))
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        topk_weights, topk_ids = torch.topk(routing, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        if self.all_to_all:
            return torch.ops.graphmode.moe_all_to_all(x, self.w13, self.w2, topk_weights.to(x.dtype), topk_ids,
                                                      self.expert_starts, self.parallel.expert_group[2],
                                                      self.parallel.tokens_shared)
        if self.num_local_experts != self.num_experts:
            local = topk_ids - self.expert_start
            topk_ids = torch.where((local >= 0) & (local < self.num_local_experts), local, -1)
        out = torch.ops.graphmode.fused_moe(x, self.w13, self.w2, topk_weights.to(x.dtype), topk_ids)
        label = "moe_combine" if self.parallel.expert_parallel else "tp_all_reduce"
        return reduce_across(out, self.parallel, label)


def _is_sparse_layer(config: Any, layer_idx: int) -> bool:
    if layer_idx in (getattr(config, "mlp_only_layers", None) or []):
        return False
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return config.num_experts > 0 and (layer_idx + 1) % step == 0


def _moe_mlp(config: Any, layer_idx: int) -> nn.Module:
    if _is_sparse_layer(config, layer_idx):
        return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                              config.num_experts_per_tok, getattr(config, "norm_topk_prob", False))
    return GatedMLP(config.hidden_size, config.intermediate_size)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    make_mlp = staticmethod(_moe_mlp)
