"""RMSNorm fusions: ``x + residual`` followed by RMSNorm of the sum, and RMSNorm alone.

In a decoder layer ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))`` the adds feeding
post_attention_layernorm and the next layer's input_layernorm produce the residual stream, so
the sum is used again: those become ``fused_add_rms_norm`` (2 per layer boundary, 2 * L - 1 in a
whole model). The first input_layernorm and the final norm (whose sum is not used again) remain
single norms and become ``rms_norm``; run fuse_add_rms_norm first so the longer pattern wins.
"""
from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import Match

import runtime.ops.rms_norm  # noqa: F401  (registers graphmode::rms_norm, graphmode::fused_add_rms_norm)
from passes.base import register_pass
from passes.patterns import PATTERN_DTYPES, PatternPass, users_outside

_EPS = 1e-6  # trace value only: eps is matched as an argument


def rms_norm_pattern(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # models/layers.py RMSNorm.forward
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rms_norm_replacement(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.graphmode.rms_norm(x, weight, eps)


def add_rms_norm_pattern(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = x + residual
    return rms_norm_pattern(hidden, weight, eps), hidden


def add_rms_norm_replacement(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    normed, hidden = torch.ops.graphmode.fused_add_rms_norm(x, residual, weight, eps)
    return normed, hidden


def _sum_used_again(match: Match) -> bool:
    # Outputs are (normed, sum); a sum used only by the norm is the model's last add.
    return users_outside(match, match.output_nodes()[1])


def _rows(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(4, 16, dtype=dtype)


@register_pass
class FuseAddRMSNormPass(PatternPass):
    """(x + residual) -> RMSNorm, the sum also used later -> graphmode::fused_add_rms_norm."""

    name = "fuse_add_rms_norm"

    def register_patterns(self) -> None:
        inputs = [(_rows(d), _rows(d), torch.randn(16, dtype=d)) for d in PATTERN_DTYPES]
        self.register(add_rms_norm_pattern, add_rms_norm_replacement, inputs, extra_check=_sum_used_again,
                      scalars={"eps": _EPS})


@register_pass
class FuseRMSNormPass(PatternPass):
    """RMSNorm over the last dim (any rank) -> graphmode::rms_norm."""

    name = "fuse_rms_norm"

    def register_patterns(self) -> None:
        inputs = [(_rows(d), torch.randn(16, dtype=d)) for d in PATTERN_DTYPES]
        self.register(rms_norm_pattern, rms_norm_replacement, inputs, scalars={"eps": _EPS})

