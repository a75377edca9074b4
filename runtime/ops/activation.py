"""``graphmode::silu_and_mul``: the SwiGLU activation ``silu(gate) * up`` as one kernel.

The input is the fused gate/up projection [..., 2I]: the first half is the gate, the second the
up projection (what ``x.chunk(2, dim=-1)`` in models/layers.py GatedMLP yields).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.ops.kernels import run_platform_kernel, triton_module, use_triton
from runtime.ops.library import graph_op

SILU_AND_MUL_OP = "graphmode::silu_and_mul"


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) * up).contiguous()


@graph_op(SILU_AND_MUL_OP, mutates_args=())
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] -> [..., I]."""
    result = run_platform_kernel(SILU_AND_MUL_OP, gate_up)
    if result is not None:
        return result
    if gate_up.shape[-1] % 2 == 0 and use_triton(SILU_AND_MUL_OP, gate_up):
        return triton_module("triton_activation").silu_and_mul(gate_up)
    return silu_and_mul_reference(gate_up)


@silu_and_mul.register_fake
def _silu_and_mul_fake(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
