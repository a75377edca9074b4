"""SwiGLU fusion: ``F.silu(gate) * up`` with gate and up the two halves of one tensor.

models/layers.py GatedMLP splits its fused gate/up projection with ``.chunk(2, dim=-1)``; make_fx
records that as ``split`` + two ``getitem``s, which the pattern includes, so the op can read the
projection output directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import runtime.ops.activation  # noqa: F401  (registers graphmode::silu_and_mul)
from passes.base import register_pass
from passes.patterns import PATTERN_DTYPES, PatternPass


def silu_mul_pattern(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_replacement(gate_up: torch.Tensor) -> torch.Tensor:
    return torch.ops.graphmode.silu_and_mul(gate_up)


@register_pass
class FuseSiluMulPass(PatternPass):
    """chunk(2, -1) -> silu(gate) * up  ->  graphmode::silu_and_mul."""

    name = "fuse_silu_mul"

    def register_patterns(self) -> None:
        inputs = [(torch.randn(4, 32, dtype=d),) for d in PATTERN_DTYPES]
        self.register(silu_mul_pattern, silu_mul_replacement, inputs)
