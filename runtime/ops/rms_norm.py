"""``graphmode::rms_norm`` and ``graphmode::fused_add_rms_norm``: RMSNorm as one kernel.

The references repeat models/layers.py RMSNorm op for op (upcast to fp32, ``x * rsqrt(mean(x^2) + eps)``,
cast back, then multiply by the weight in the input dtype), so replacing the unfused graph with the
reference is bit-identical. Both ops are functional: they return new, contiguous tensors.
"""
from __future__ import annotations

import torch

from runtime.ops.kernels import run_platform_kernel, triton_module, use_triton
from runtime.ops.library import graph_op

RMS_NORM_OP = "graphmode::rms_norm"
FUSED_ADD_RMS_NORM_OP = "graphmode::fused_add_rms_norm"


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    # contiguous(): the fake impl and the Triton kernel promise a dense row-major result.
    return (weight * h.to(dtype)).contiguous()


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = (x + residual).contiguous()
    return rms_norm_reference(new_residual, weight, eps), new_residual


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


def _triton_ok(op_name: str, x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor) -> bool:
    # The kernel handles one dtype per call and rows that fit one block; the rest is rare enough
    # for the reference.
    same_dtype = all(t.dtype == x.dtype for t in (weight, *others))
    row_weight = weight.shape == (x.shape[-1],)
    return same_dtype and row_weight and x.shape[-1] <= 65536 and use_triton(op_name, x, weight, *others)


@graph_op(RMS_NORM_OP, mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` [..., H] with ``weight`` [H]."""
    result = run_platform_kernel(RMS_NORM_OP, x, weight, eps)
    if result is not None:
        return result
    if _triton_ok(RMS_NORM_OP, x, weight):
        return triton_module("triton_rms_norm").rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


@graph_op(FUSED_ADD_RMS_NORM_OP, mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``; the sum is the new residual stream."""
    result = run_platform_kernel(FUSED_ADD_RMS_NORM_OP, x, residual, weight, eps)
    if result is not None:
        return result
    if _triton_ok(FUSED_ADD_RMS_NORM_OP, x, weight, residual) and x.shape == residual.shape:
        return triton_module("triton_rms_norm").fused_add_rms_norm(x, residual, weight, eps)
    return fused_add_rms_norm_reference(x, residual, weight, eps)


@fused_add_rms_norm.register_fake
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    shape = torch.broadcast_shapes(x.shape, residual.shape)
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    normed = x.new_empty(shape, dtype=torch.promote_types(sum_dtype, weight.dtype))
    return normed, x.new_empty(shape, dtype=sum_dtype)
