"""Qwen3 fusion: per-head RMSNorm of q and k followed by rotary -> ``graphmode::qk_norm_rotary``.

One op, not rms_norm + rotary_embedding: the kernel reads each (token, head) row once, normalises
and rotates it in registers, and writes it once (one launch per layer instead of three). Must run
before fuse_rotary and fuse_rms_norm, which would otherwise take the pieces. Both norms must use the
same eps (Qwen3's do); otherwise the pieces are left to those passes.
"""
from __future__ import annotations

import torch

import runtime.ops.qk_norm_rotary  # noqa: F401  (registers graphmode::qk_norm_rotary)
from passes.base import register_pass
from passes.fuse_add_rms_norm import rms_norm_pattern
from passes.fuse_rotary import rotary_examples, rotary_gptj_pattern, rotary_neox_pattern
from passes.patterns import PatternPass

_EPS = 1e-6  # trace value only: eps is matched as an argument


def qk_norm_rotary_neox_pattern(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                                k_weight: torch.Tensor, cos_sin_cache: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # models/layers.py Attention.forward with q_norm/k_norm, q and k already [T, heads, head_dim]
    q, k = rms_norm_pattern(q, q_weight, eps), rms_norm_pattern(k, k_weight, eps)
    return rotary_neox_pattern(positions, q, k, cos_sin_cache)


def qk_norm_rotary_neox_replacement(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                    q_weight: torch.Tensor, k_weight: torch.Tensor, cos_sin_cache: torch.Tensor,
                                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = torch.ops.graphmode.qk_norm_rotary(
        positions, q, k, q_weight, k_weight, eps, cos_sin_cache, cos_sin_cache.shape[-1], True)
    return q_out, k_out


def qk_norm_rotary_gptj_pattern(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                                k_weight: torch.Tensor, cos_sin_cache: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = rms_norm_pattern(q, q_weight, eps), rms_norm_pattern(k, k_weight, eps)
    return rotary_gptj_pattern(positions, q, k, cos_sin_cache)


def qk_norm_rotary_gptj_replacement(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                    q_weight: torch.Tensor, k_weight: torch.Tensor, cos_sin_cache: torch.Tensor,
                                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = torch.ops.graphmode.qk_norm_rotary(
        positions, q, k, q_weight, k_weight, eps, cos_sin_cache, cos_sin_cache.shape[-1], False)
    return q_out, k_out


@register_pass
class FuseQKNormRotaryPass(PatternPass):
    """rms_norm(q), rms_norm(k) over head_dim, then rotary -> graphmode::qk_norm_rotary."""

    name = "fuse_qk_norm_rotary"

    def register_patterns(self) -> None:
        inputs = [(positions, q, k, torch.randn(q.shape[-1], dtype=q.dtype), torch.randn(k.shape[-1], dtype=k.dtype),
                   table) for positions, q, k, table in rotary_examples(True)]
        self.register(qk_norm_rotary_neox_pattern, qk_norm_rotary_neox_replacement, inputs, scalars={"eps": _EPS})
        self.register(qk_norm_rotary_gptj_pattern, qk_norm_rotary_gptj_replacement, inputs, scalars={"eps": _EPS})

