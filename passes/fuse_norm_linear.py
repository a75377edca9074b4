"""Norm-into-projection fusion: an RMSNorm (after fuse_add_rms_norm / fuse_rms_norm) and the linear
it feeds, and the SwiGLU after it (after fuse_silu_mul), become one op.

Per decoder layer that is ``fused_add_rms_norm -> q/k/v linear`` and ``fused_add_rms_norm -> gate/up
linear -> silu_and_mul``: five launches become two (runtime/ops/norm_linear.py). The pattern of the
gated form is longer and anchored further down the graph, so where both match, it wins. A norm
whose output also feeds something else (an MoE router beside its experts) is not matched: the
pattern's intermediate nodes must have no users outside it.

Not in the default pass list: the fused kernel is correct under the Triton interpreter and on the
reference path, and waits for GPU timings against cuBLAS before it is the default.
"""
from __future__ import annotations

import torch

import runtime.ops.norm_linear
from passes.base import register_pass
from passes.patterns import PATTERN_DTYPES, PatternPass
from runtime.ops.norm_linear import project  # (the module registers graphmode::rms_norm_linear, add_rms_norm_linear)

_EPS = 1e-6  # trace value only: eps is matched as an argument
_TOKENS, _HIDDEN, _COLUMNS = 4, 16, 32


def _add_norm_patterns(bias: bool, gated: bool):
    """(search, replacement) for fused_add_rms_norm -> linear (with bias) (-> silu_and_mul).

    Explicit signatures: register_replacement names the arguments (eps is matched by name)."""
    def search(x, residual, norm_weight, weight, eps):
        normed, summed = torch.ops.graphmode.fused_add_rms_norm(x, residual, norm_weight, eps)
        return project(normed, weight, None, gated), summed

    def replace(x, residual, norm_weight, weight, eps):
        out, summed = torch.ops.graphmode.add_rms_norm_linear(x, residual, norm_weight, eps, weight, None, gated)
        return out, summed

    def search_bias(x, residual, norm_weight, weight, bias, eps):
        normed, summed = torch.ops.graphmode.fused_add_rms_norm(x, residual, norm_weight, eps)
        return project(normed, weight, bias, gated), summed

    def replace_bias(x, residual, norm_weight, weight, bias, eps):
        out, summed = torch.ops.graphmode.add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, gated)
        return out, summed

    return (search_bias, replace_bias) if bias else (search, replace)


def _norm_patterns(bias: bool, gated: bool):
    """(search, replacement) for rms_norm -> linear (with bias) (-> silu_and_mul)."""
    def search(x, norm_weight, weight, eps):
        return project(torch.ops.graphmode.rms_norm(x, norm_weight, eps), weight, None, gated)

    def replace(x, norm_weight, weight, eps):
        return torch.ops.graphmode.rms_norm_linear(x, norm_weight, eps, weight, None, gated)

    def search_bias(x, norm_weight, weight, bias, eps):
        return project(torch.ops.graphmode.rms_norm(x, norm_weight, eps), weight, bias, gated)

    def replace_bias(x, norm_weight, weight, bias, eps):
        return torch.ops.graphmode.rms_norm_linear(x, norm_weight, eps, weight, bias, gated)

    return (search_bias, replace_bias) if bias else (search, replace)


def _examples(with_residual: bool, bias: bool) -> list[tuple]:
    def one(dtype: torch.dtype) -> tuple:
        rows = [torch.randn(_TOKENS, _HIDDEN, dtype=dtype) for _ in range(2 if with_residual else 1)]
        weights = [torch.randn(_HIDDEN, dtype=dtype), torch.randn(_COLUMNS, _HIDDEN, dtype=dtype)]
        return (*rows, *weights, *([torch.randn(_COLUMNS, dtype=dtype)] if bias else []))
    return [one(dtype) for dtype in PATTERN_DTYPES]


@register_pass
class FuseNormLinearPass(PatternPass):
    """(add +) RMSNorm -> linear (-> SiLU-and-mul) -> graphmode::(add_)rms_norm_linear."""

    name = "fuse_norm_linear"

    def source_objects(self) -> list:
        # The patterns call the op module's ``project``: its code is part of what they match.
        return super().source_objects() + [runtime.ops.norm_linear]

    def register_patterns(self) -> None:
        for gated in (True, False):
            for bias in (False, True):
                self.register(*_add_norm_patterns(bias, gated), _examples(True, bias), scalars={"eps": _EPS})
                self.register(*_norm_patterns(bias, gated), _examples(False, bias), scalars={"eps": _EPS})
