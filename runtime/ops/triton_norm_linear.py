"""Triton RMSNorm -> linear (-> SiLU-and-mul) for few tokens: one kernel per projection of a decode step.

Decode runs a handful of tokens through GEMMs whose weights are read once per step, so the step is
bound by memory and by kernel boundaries. Here the norm that precedes the q/k/v and the gate/up
projections runs in the GEMM's prologue and the SwiGLU in its epilogue: each program recomputes
its rows' RMS (the activations are tiny next to the weight tile it streams), normalises the
activations as it loads them, and multiplies them with its slice of output columns.

Grid: (output column blocks, row blocks). The first column block also writes the residual sum.
The gated form computes the gate and the up column of the same index in one program, so the
SiLU-and-mul needs nothing from another program. No split-K and no atomics: every output is summed
by one program in a fixed order, so results do not depend on scheduling.

Rounding follows the unfused ops: the residual sum, the normalised row, the weight product, the
projection and the activation are rounded to the tensor dtype where torch rounds them. The sum of
squares and the dot products are accumulated in fp32 in this kernel's own order, so results are
not bit-identical to cuBLAS (tests/gpu compares both against fp32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from runtime.platforms import current_platform

__all__ = ["MAX_TOKENS", "norm_linear"]

# Rows the kernel takes (decode batches); more rows is a prefill, where cuBLAS's tiled GEMM wins.
MAX_TOKENS = 64
# The Triton interpreter (CPU tests) has no libdevice; its tl.exp is numpy's anyway.
_LIBDEVICE = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _normed_rows(x_ptr, res_ptr, nw_ptr, rows, k, rstd, stride_x, stride_r,
                 M, K: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """[BLOCK_M, BLOCK_K] of ``norm_weight * (h * rstd)`` in the tensor dtype, h = x (+ residual)."""
    dtype = x_ptr.dtype.element_ty
    mask = (rows[:, None] < M) & (k[None, :] < K)
    h = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (h + tl.load(res_ptr + rows[:, None] * stride_r + k[None, :], mask=mask, other=0.0)).to(dtype)
    normed = (h.to(tl.float32) * rstd[:, None]).to(dtype)
    nw = tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    return (nw[None, :] * normed.to(tl.float32)).to(dtype)


@triton.jit
def _norm_linear_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, bias_ptr, out_ptr, sum_ptr,
    M, N, K: tl.constexpr, eps, stride_x, stride_r, stride_w, stride_o, stride_s,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, LIBDEVICE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    dtype = out_ptr.dtype.element_ty

    # Pass 1: each row's mean square (and, from the first column block, the residual sum).
    sum_sq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask = (rows[:, None] < M) & (k[None, :] < K)
        h = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            h = (h + tl.load(res_ptr + rows[:, None] * stride_r + k[None, :], mask=mask, other=0.0)).to(dtype)
            if pid_n == 0:
                tl.store(sum_ptr + rows[:, None] * stride_s + k[None, :], h, mask=mask)
        hf = h.to(tl.float32)
        sum_sq += tl.sum(hf * hf, axis=1)
    rstd = tl.rsqrt(sum_sq / K + eps)

    # Pass 2: the projection of the normalised rows onto this block's columns (W is [N_total, K]).
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if GATED:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = _normed_rows(x_ptr, res_ptr, nw_ptr, rows, k, rstd, stride_x, stride_r, M, K, HAS_RESIDUAL)
        w_mask = (k[:, None] < K) & col_mask[None, :]
        w = tl.load(w_ptr + cols[None, :] * stride_w + k[:, None], mask=w_mask, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if GATED:
            w_up = tl.load(w_ptr + (cols + N)[None, :] * stride_w + k[:, None], mask=w_mask, other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = acc.to(dtype)
    if GATED:
        # As silu_and_mul (runtime/ops/triton_activation.py): the projection rounded, x / (1 + exp(-x))
        # with the accurate exp and an IEEE division, rounded again before the multiply.
        gate = out.to(tl.float32)
        if LIBDEVICE:
            act = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate))
        else:
            act = tl.math.div_rn(gate, 1.0 + tl.exp(-gate))
        out = (act.to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
    out_mask = (rows[:, None] < M) & col_mask[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out, mask=out_mask)


def _block_n(columns: int, row_blocks: int, device: torch.device) -> int:
    """Output columns per program: as wide as keeps about two programs per multiprocessor (the widest,
    fewest programs, where there are none: the interpreter runs programs one by one)."""
    sms = current_platform.multiprocessor_count(device)
    block = 128
    if sms is None:
        return block
    while block > 16 and triton.cdiv(columns, block) * row_blocks < 2 * sms:
        block //= 2
    return block


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None, gated: bool, block_n: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(projection, residual sum or None): ``linear(rms_norm(x + residual))`` of x [M, K], weight [N, K];
    gated: ``silu(gate) * up`` of the projection's two halves, [M, N / 2]. ``block_n``: output columns per
    program (default: chosen from the shape and the device)."""
    rows, width = x.shape
    columns = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty(rows, columns, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(x) if residual is not None else None
    if rows == 0:
        return out, summed
    # tl.dot needs 16 rows; fewer are masked, which costs nothing where the weights set the pace.
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    row_blocks = triton.cdiv(rows, block_m)
    block_n = block_n or _block_n(columns, row_blocks, x.device)
    block_k = min(128 if gated else 256, max(32, triton.next_power_of_2(width)))
    _norm_linear_kernel[(triton.cdiv(columns, block_n), row_blocks)](
        x, residual if residual is not None else x, norm_weight, weight,
        bias if bias is not None else weight, out, summed if summed is not None else out,
        rows, columns, width, eps,
        x.stride(0), residual.stride(0) if residual is not None else 0, weight.stride(0), out.stride(0),
        summed.stride(0) if summed is not None else 0,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, GATED=gated, LIBDEVICE=_LIBDEVICE,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=3,
    )
    return out, summed
