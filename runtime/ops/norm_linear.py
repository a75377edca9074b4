"""``graphmode::rms_norm_linear`` and ``graphmode::add_rms_norm_linear``: a norm and the projection it feeds.

In a decoder layer every RMSNorm feeds one projection (q/k/v after input_layernorm, gate/up after
post_attention_layernorm), and the gate/up projection feeds the SwiGLU. For the few tokens of a
decode step these three launches become one (runtime/ops/triton_norm_linear.py): ``gated`` folds
``silu(gate) * up`` of the projection's two halves into the same op.

Where the fused kernel does not serve a call (a prefill's many tokens, CPU, an op named in
GRAPHMODE_OP_KERNELS) the op runs the unfused ops it replaced, so on those paths the result is
bit-identical to the graph before the pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.ops.activation import silu_and_mul_reference  # (and registers graphmode::silu_and_mul)
from runtime.ops.rms_norm import rms_norm_reference  # (and registers graphmode::rms_norm, fused_add_rms_norm)
from runtime.ops.kernels import run_platform_kernel, triton_module, use_triton
from runtime.ops.library import graph_op

RMS_NORM_LINEAR_OP = "graphmode::rms_norm_linear"
ADD_RMS_NORM_LINEAR_OP = "graphmode::add_rms_norm_linear"


def project(normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    """``linear(normed, weight, bias)``, then the SwiGLU of its halves when ``gated``: the unfused ops (what the
    fusion pass matches, and the op's path off the kernel)."""
    projected = F.linear(normed, weight, bias)
    return torch.ops.graphmode.silu_and_mul(projected) if gated else projected


def rms_norm_linear_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                              bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    projected = F.linear(rms_norm_reference(x, norm_weight, eps), weight, bias)
    return silu_and_mul_reference(projected) if gated else projected


def add_rms_norm_linear_reference(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                  weight: torch.Tensor, bias: torch.Tensor | None, gated: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    summed = (x + residual).contiguous()
    return rms_norm_linear_reference(summed, norm_weight, eps, weight, bias, gated), summed


def _fused_kernel_serves(op_name: str, x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, gated: bool, *others: torch.Tensor) -> bool:
    kernel = triton_module("triton_norm_linear") if use_triton(op_name, x, weight) else None
    if kernel is None or x.dim() != 2 or x.shape[0] > kernel.MAX_TOKENS:
        return False
    tensors = [x, norm_weight, weight, *others] + ([bias] if bias is not None else [])
    return (all(t.dtype == x.dtype and t.stride(-1) == 1 for t in tensors)
            and norm_weight.shape == (x.shape[1],) and weight.shape[1] == x.shape[1]
            and (not gated or weight.shape[0] % 2 == 0))


@graph_op(RMS_NORM_LINEAR_OP, mutates_args=())
def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    """``linear(rms_norm(x), weight, bias)``, then ``silu(gate) * up`` of its halves when ``gated``."""
    result = run_platform_kernel(RMS_NORM_LINEAR_OP, x, norm_weight, eps, weight, bias, gated)
    if result is not None:
        return result
    if _fused_kernel_serves(RMS_NORM_LINEAR_OP, x, norm_weight, weight, bias, gated):
        return triton_module("triton_norm_linear").norm_linear(x, None, norm_weight, eps, weight, bias, gated)[0]
    return project(torch.ops.graphmode.rms_norm(x, norm_weight, eps), weight, bias, gated)


@rms_norm_linear.register_fake
def _rms_norm_linear_fake(x, norm_weight, eps, weight, bias, gated):
    columns = weight.shape[0] // 2 if gated else weight.shape[0]
    return x.new_empty((*x.shape[:-1], columns))


@graph_op(ADD_RMS_NORM_LINEAR_OP, mutates_args=())
def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor | None, gated: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm_linear(x + residual, ...), x + residual)``; the sum is the new residual stream."""
    result = run_platform_kernel(ADD_RMS_NORM_LINEAR_OP, x, residual, norm_weight, eps, weight, bias, gated)
    if result is not None:
        return result
    if (x.shape == residual.shape
            and _fused_kernel_serves(ADD_RMS_NORM_LINEAR_OP, x, norm_weight, weight, bias, gated, residual)):
        return triton_module("triton_norm_linear").norm_linear(x, residual, norm_weight, eps, weight, bias, gated)
    normed, summed = torch.ops.graphmode.fused_add_rms_norm(x, residual, norm_weight, eps)
    return project(normed, weight, bias, gated), summed


@add_rms_norm_linear.register_fake
def _add_rms_norm_linear_fake(x, residual, norm_weight, eps, weight, bias, gated):
    columns = weight.shape[0] // 2 if gated else weight.shape[0]
    shape = torch.broadcast_shapes(x.shape, residual.shape)
    return x.new_empty((*shape[:-1], columns)), x.new_empty(shape, dtype=torch.promote_types(x.dtype, residual.dtype))
