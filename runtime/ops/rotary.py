"""``graphmode::rotary_embedding``: rotary position embedding of q and k in one op.

``cos_sin_cache`` [max_positions, head_dim] holds cos in its first half and sin in its second,
as models/layers.py RotaryEmbedding builds it. ``is_neox`` picks the pairing: neox rotates the two
halves of a head against each other, gpt-j rotates interleaved (even, odd) pairs. q and k are
[T, heads * head_dim] or [T, heads, head_dim]; outputs have the input's shape and dtype.
"""
from __future__ import annotations

import torch

from runtime.ops.kernels import run_platform_kernel, triton_module, use_triton
from runtime.ops.library import graph_op

ROTARY_EMBEDDING_OP = "graphmode::rotary_embedding"


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    # Same op order as RotaryEmbedding._rotate, so the fused graph is bit-identical on the reference.
    shape = x.shape
    x = x.view(shape[0], -1, head_dim)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).view(shape)


def _rotate_gptj(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    shape = x.shape
    x = x.view(shape[0], -1, head_dim)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).view(shape)


def rotary_embedding_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    rotate = _rotate_neox if is_neox else _rotate_gptj
    return rotate(q, cos, sin, head_dim).contiguous(), rotate(k, cos, sin, head_dim).contiguous()


def triton_rotary_ok(op_name: str, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether the Triton kernel serves this call (full-width rotary of same-dtype q and k)."""
    return (q.dtype == k.dtype and cos_sin_cache.shape[-1] == head_dim and head_dim % 2 == 0
            and q.stride(-1) == 1 and k.stride(-1) == 1 and use_triton(op_name, positions, q, k, cos_sin_cache))


@graph_op(ROTARY_EMBEDDING_OP, mutates_args=())
def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    result = run_platform_kernel(ROTARY_EMBEDDING_OP, positions, q, k, cos_sin_cache, head_dim, is_neox)
    if result is not None:
        return result
    if triton_rotary_ok(ROTARY_EMBEDDING_OP, positions, q, k, cos_sin_cache, head_dim):
        return triton_module("triton_rotary").rotary_embedding(positions, q, k, cos_sin_cache, head_dim, is_neox)
    return rotary_embedding_reference(positions, q, k, cos_sin_cache, head_dim, is_neox)


@rotary_embedding.register_fake
def _rotary_embedding_fake(positions, q, k, cos_sin_cache, head_dim, is_neox):
    return q.new_empty(q.shape), k.new_empty(k.shape)
