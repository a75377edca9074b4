"""``graphmode::qk_norm_rotary``: Qwen3's per-head q/k RMSNorm followed by rotary, in one op.

One op rather than rms_norm + rms_norm + rotary_embedding: every (token, head) row is read once,
normalised and rotated in registers, which saves two launches and two round trips through memory
per layer. q and k are [T, heads, head_dim] (the norm runs over head_dim); the weights are [head_dim].
"""
from __future__ import annotations

import torch

from runtime.ops.kernels import run_platform_kernel, triton_module
from runtime.ops.library import graph_op
from runtime.ops.rms_norm import rms_norm_reference
from runtime.ops.rotary import rotary_embedding_reference, triton_rotary_ok

QK_NORM_ROTARY_OP = "graphmode::qk_norm_rotary"


def qk_norm_rotary_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    eps: float, cos_sin_cache: torch.Tensor, head_dim: int, is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    q = rms_norm_reference(q, q_weight, eps)
    k = rms_norm_reference(k, k_weight, eps)
    return rotary_embedding_reference(positions, q, k, cos_sin_cache, head_dim, is_neox)


@graph_op(QK_NORM_ROTARY_OP, mutates_args=())
def qk_norm_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    eps: float, cos_sin_cache: torch.Tensor, head_dim: int, is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    result = run_platform_kernel(QK_NORM_ROTARY_OP, positions, q, k, q_weight, k_weight, eps, cos_sin_cache,
                                 head_dim, is_neox)
    if result is not None:
        return result
    weights_fit = all(w.dtype == q.dtype and w.shape == (head_dim,) for w in (q_weight, k_weight))
    per_head = q.shape[-1] == head_dim and k.shape[-1] == head_dim  # the norm runs over the last dim
    if weights_fit and per_head and triton_rotary_ok(QK_NORM_ROTARY_OP, positions, q, k, cos_sin_cache, head_dim):
        return triton_module("triton_rotary").qk_norm_rotary(
            positions, q, k, q_weight, k_weight, eps, cos_sin_cache, head_dim, is_neox)
    return qk_norm_rotary_reference(positions, q, k, q_weight, k_weight, eps, cos_sin_cache, head_dim, is_neox)


@qk_norm_rotary.register_fake
def _qk_norm_rotary_fake(positions, q, k, q_weight, k_weight, eps, cos_sin_cache, head_dim, is_neox):
    q_dtype = torch.promote_types(q.dtype, q_weight.dtype)
    k_dtype = torch.promote_types(k.dtype, k_weight.dtype)
    return q.new_empty(q.shape, dtype=q_dtype), k.new_empty(k.shape, dtype=k_dtype)
