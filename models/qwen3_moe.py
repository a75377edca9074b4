"""Qwen3-MoE: the Qwen3 decoder with sparse top-k expert MLPs in (most) layers."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import runtime.ops.moe  # noqa: F401  (registers graphmode::fused_moe)
from models.layers import GatedMLP
from models.llama import Qwen3ForCausalLM


class SparseMoeBlock(nn.Module):
    """Router + stacked experts; the expert math is the opaque ``graphmode::fused_moe`` op."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        topk_weights, topk_ids = torch.topk(routing, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return torch.ops.graphmode.fused_moe(x, self.w13, self.w2, topk_weights.to(x.dtype), topk_ids)


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
