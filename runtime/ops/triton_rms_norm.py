"""Triton RMSNorm kernels (CUDA; imported lazily by runtime/ops/rms_norm.py).

One program per row with the whole row in registers: hidden sizes of LLMs (<= 16K) fit, and one
pass over memory is what makes this memory-bound op fast. Math is fp32; values are rounded to the
input dtype at the same points as the unfused torch code (the sum, the normalised row, the weight
product), so the results differ from the reference only by the order of the mean's summation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm", "fused_add_rms_norm"]


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    x_row_stride, res_row_stride, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # Rounded like the unfused ``x + residual``: the residual stream must not drift.
        x = (x + r).to(dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
        x = x.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    rstd = tl.rsqrt(mean_sq + eps)
    normed = (x * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * normed).to(dtype), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, H] with unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor, res_out: torch.Tensor | None) -> None:
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(n_rows,)](
        x, residual if residual is not None else x, weight, out, res_out if res_out is not None else out,
        x.stride(0), residual.stride(0) if residual is not None else 0, n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
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
