"""Triton RMSNorm kernels (CUDA; imported lazily by runtime/ops/rms_norm.py).

One program per row with the whole row in registers: hidden sizes of LLMs (<= 16K) fit, and one
pass over memory is what makes this memory-bound op fast. Math is fp32; values are rounded to the
input dtype at the same points as the unfused torch code (the sum, the normalised row, the weight
product), and the mean of squares is summed in the order torch's CUDA reduction sums it
(runtime/ops/reduction_order.py), so the result is bit-identical to the unfused ops wherever that
order is modelled.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from runtime.ops.reduction_order import row_sum_layout
from runtime.ops.triton_lane_tree import lane_tree_sum

__all__ = ["rms_norm", "fused_add_rms_norm"]


@triton.jit
def _row_values(x_row, res_row, cols, n_cols, HAS_RESIDUAL: tl.constexpr, dtype: tl.constexpr):
    """The fp32 values the norm runs over: x, or x + residual rounded like the unfused add."""
    mask = cols < n_cols
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype).to(tl.float32)
    return x


@triton.jit
def _sum_squares_torch_order(x_row, res_row, n_cols, HAS_RESIDUAL: tl.constexpr, dtype: tl.constexpr,
                             LANES: tl.constexpr, VEC: tl.constexpr, STEPS: tl.constexpr):
    """Sum of the row's squares in torch's order (reduction_order.py): per-lane accumulators, then
    the lane tree."""
    lane = tl.arange(0, LANES)
    acc0 = tl.zeros([LANES], tl.float32)
    acc1 = tl.zeros([LANES], tl.float32)
    acc2 = tl.zeros([LANES], tl.float32)
    acc3 = tl.zeros([LANES], tl.float32)
    if VEC == 4:  # one vector per step, its four positions into their own accumulators
        for step in range(STEPS):
            base = (step * LANES + lane) * 4
            v = _row_values(x_row, res_row, base, n_cols, HAS_RESIDUAL, dtype)
            acc0 += v * v
            v = _row_values(x_row, res_row, base + 1, n_cols, HAS_RESIDUAL, dtype)
            acc1 += v * v
            v = _row_values(x_row, res_row, base + 2, n_cols, HAS_RESIDUAL, dtype)
            acc2 += v * v
            v = _row_values(x_row, res_row, base + 3, n_cols, HAS_RESIDUAL, dtype)
            acc3 += v * v
    else:  # element by element: element step * LANES + lane into accumulator step % 4 (STEPS <= 4)
        v = _row_values(x_row, res_row, lane, n_cols, HAS_RESIDUAL, dtype)
        acc0 += v * v
        if STEPS > 1:
            v = _row_values(x_row, res_row, LANES + lane, n_cols, HAS_RESIDUAL, dtype)
            acc1 += v * v
        if STEPS > 2:
            v = _row_values(x_row, res_row, 2 * LANES + lane, n_cols, HAS_RESIDUAL, dtype)
            acc2 += v * v
        if STEPS > 3:
            v = _row_values(x_row, res_row, 3 * LANES + lane, n_cols, HAS_RESIDUAL, dtype)
            acc3 += v * v
    v = ((acc0 + acc1) + acc2) + acc3
    return tl.sum(lane_tree_sum(tl.reshape(v, [1, LANES]), LANES), axis=0)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    x_row_stride, res_row_stride, n_cols, inv_n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    TORCH_ORDER: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, STEPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    x_row = x_ptr + row * x_row_stride
    res_row = res_ptr + row * res_row_stride
    x = _row_values(x_row, res_row, cols, n_cols, HAS_RESIDUAL, dtype)
    if HAS_RESIDUAL:
        tl.store(res_out_ptr + row * n_cols + cols, x.to(dtype), mask=mask)
    if TORCH_ORDER:
        sum_sq = _sum_squares_torch_order(x_row, res_row, n_cols, HAS_RESIDUAL, dtype, LANES, VEC, STEPS)
    else:
        sum_sq = tl.sum(x * x, axis=0)
    # torch's mean multiplies by float32(1 / n) rather than dividing by n.
    rstd = tl.rsqrt(sum_sq * inv_n_cols + eps)
    normed = (x * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * normed).to(dtype), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, H] with unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@functools.lru_cache(maxsize=None)
def _fp32_reciprocal(n: int) -> float:
    """float32(1 / n) correctly rounded, as torch's mean computes its factor."""
    return torch.tensor(1.0, dtype=torch.float32).div(n).item()


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor, res_out: torch.Tensor | None) -> None:
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    block = triton.next_power_of_2(n_cols)
    layout = row_sum_layout(n_rows, n_cols)
    _rms_norm_kernel[(n_rows,)](
        x, residual if residual is not None else x, weight, out, res_out if res_out is not None else out,
        x.stride(0), residual.stride(0) if residual is not None else 0, n_cols,
        _fp32_reciprocal(n_cols), eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, TORCH_ORDER=layout is not None,
        LANES=layout.lanes if layout else 1, VEC=layout.vec if layout else 1,
        STEPS=layout.steps(n_cols) if layout else 1, num_warps=_num_warps(block),
        # torch rounds the square before adding it and the mean before adding eps: no FMAs.
        enable_fp_fusion=False,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_rows(x), None, weight.contiguous(), eps, out.view(-1, x.shape[-1]), None)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out)
    hidden = x.shape[-1]
    _launch(_rows(x), _rows(residual), weight.contiguous(), eps, out.view(-1, hidden), res_out.view(-1, hidden))
    return out, res_out
