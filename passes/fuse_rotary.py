"""Rotary embedding fusion: the table lookup and both rotations of q and k -> one op.

The neox pattern is models/layers.py RotaryEmbedding (rotate halves); the gpt-j pattern rotates
interleaved (even, odd) pairs. q and k may be [T, heads * head_dim] (Llama) or [T, heads, head_dim]
(after Qwen3's q/k norm): both are registered, since make_fx records a view of a 3-d q to its own
shape, which canonicalisation removes.
"""
from __future__ import annotations

import torch

import runtime.ops.rotary  # noqa: F401  (registers graphmode::rotary_embedding)
from passes.base import register_pass
from passes.patterns import PATTERN_DTYPES, PatternPass

_HEAD_DIM, _MAX_POSITIONS = 8, 16


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    # models/layers.py RotaryEmbedding._rotate
    shape = x.shape
    x = x.view(shape[0], -1, head_dim)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).view(shape)


def rotate_gptj(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    shape = x.shape
    x = x.view(shape[0], -1, head_dim)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).view(shape)


def rotary_neox_pattern(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The table is [max_positions, head_dim]: head_dim comes from it, as in RotaryEmbedding.
    head_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    return rotate_neox(q, cos, sin, head_dim), rotate_neox(k, cos, sin, head_dim)


def rotary_neox_replacement(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = torch.ops.graphmode.rotary_embedding(positions, q, k, cos_sin_cache, cos_sin_cache.shape[-1], True)
    return q_out, k_out


def rotary_gptj_pattern(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    return rotate_gptj(q, cos, sin, head_dim), rotate_gptj(k, cos, sin, head_dim)


def rotary_gptj_replacement(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = torch.ops.graphmode.rotary_embedding(positions, q, k, cos_sin_cache, cos_sin_cache.shape[-1], False)
    return q_out, k_out


def rotary_examples(heads_shape: bool) -> list[tuple[torch.Tensor, ...]]:
    """(positions, q, k, table) per dtype; q/k [T, H * D] or, with ``heads_shape``, [T, H, D].

    The table is fp32 as RotaryEmbedding builds it (cos/sin get cast to the q dtype), or of the q
    dtype after a ``model.to(dtype)`` (no casts).
    """
    positions = torch.arange(4) % _MAX_POSITIONS
    q_shape, k_shape = ((4, 2, _HEAD_DIM), (4, 1, _HEAD_DIM)) if heads_shape else ((4, 2 * _HEAD_DIM), (4, _HEAD_DIM))
    return [(positions, torch.randn(q_shape, dtype=d), torch.randn(k_shape, dtype=d),
             torch.randn(_MAX_POSITIONS, _HEAD_DIM, dtype=table_dtype))
            for d in PATTERN_DTYPES for table_dtype in dict.fromkeys((torch.float32, d))]


@register_pass
class FuseRotaryPass(PatternPass):
    """index_select(cos_sin_cache, positions) + rotate q and k -> graphmode::rotary_embedding."""

    name = "fuse_rotary"

    def register_patterns(self) -> None:
        inputs = rotary_examples(False) + rotary_examples(True)
        self.register(rotary_neox_pattern, rotary_neox_replacement, inputs)
        self.register(rotary_gptj_pattern, rotary_gptj_replacement, inputs)

