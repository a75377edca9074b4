"""Triton rotary embedding, optionally preceded by a per-head RMSNorm (CUDA; imported lazily).

One launch for q and k: grid (tokens, head blocks of q then head blocks of k). Each program loads
a [heads, head_dim / 2] tile of each rotation half, so the cos/sin row of its token is read once.
Values are rounded to the tensor dtype where the unfused torch code rounds them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.ops.reduction_order import RowSumLayout, row_sum_layout

__all__ = ["rotary_embedding", "qk_norm_rotary"]

_HEADS_PER_PROGRAM = 4
# The head width whose norm follows torch's summation order: torch gives a 128-wide row 32 lanes of
# one 4-element vector each, whatever the number of rows (runtime/ops/reduction_order.py).
_TORCH_ORDER_LAYOUT = RowSumLayout(lanes=32, vec=4)


@triton.jit
def _halve(v, N: tl.constexpr):
    """[H, N] -> [H, N / 2]: lane j adds lane j + N / 2 (one level of torch's tree)."""
    return tl.sum(tl.reshape(v, [v.shape[0], 2, N // 2]), axis=1)


@triton.jit
def _head_sum_squares_torch_order(x1, x2, IS_NEOX: tl.constexpr):
    """Per-head sum of squares of a 128-wide head held as its two rotary halves [H, 64], in torch's
    order: lane t sums elements 4t..4t+3 left to right, then the 32 lanes halve down to one."""
    s1 = x1 * x1
    s2 = x2 * x2
    if IS_NEOX:  # halves are elements 0..63 (lanes 0..15) and 64..127 (lanes 16..31)
        a0, a1 = tl.split(tl.reshape(s1, [s1.shape[0], 16, 2, 2]))
        p0, p2 = tl.split(a0)
        p1, p3 = tl.split(a1)
        lo = ((p0 + p1) + p2) + p3
        b0, b1 = tl.split(tl.reshape(s2, [s2.shape[0], 16, 2, 2]))
        q0, q2 = tl.split(b0)
        q1, q3 = tl.split(b1)
        hi = ((q0 + q1) + q2) + q3
        v = lo + hi  # the first level of the tree: lane j + lane j + 16
    else:  # halves are the even and odd elements: lane t holds x1[2t], x2[2t], x1[2t+1], x2[2t+1]
        e1, o1 = tl.split(tl.reshape(s1, [s1.shape[0], 32, 2]))
        e2, o2 = tl.split(tl.reshape(s2, [s2.shape[0], 32, 2]))
        v = _halve(((e1 + e2) + o1) + o2, 32)
    v = _halve(v, 16)
    v = _halve(v, 8)
    v = _halve(v, 4)
    v = _halve(v, 2)
    return tl.sum(v, axis=1)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, w_ptr, tok, head0, num_heads, tok_stride, head_stride, cos, sin, eps,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr, APPLY_NORM: tl.constexpr, TORCH_ORDER: tl.constexpr,
):
    dtype = out_ptr.dtype.element_ty
    heads = head0 + tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (d < HALF)
    if IS_NEOX:
        off1 = d
        off2 = d + HALF
    else:
        off1 = 2 * d
        off2 = 2 * d + 1
    src = x_ptr + tok * tok_stride + heads * head_stride
    x1 = tl.load(src + off1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + off2, mask=mask, other=0.0).to(tl.float32)
    if APPLY_NORM:
        if TORCH_ORDER:
            sum_sq = _head_sum_squares_torch_order(x1, x2, IS_NEOX)
        else:
            sum_sq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        mean_sq = sum_sq / (2 * HALF)  # a power of two when TORCH_ORDER: the same as torch's * (1 / n)
        rstd = tl.rsqrt(mean_sq + eps)[:, None]
        w1 = tl.load(w_ptr + off1, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + off2, mask=d < HALF, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    out1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    dst = out_ptr + tok * num_heads * (2 * HALF) + heads * (2 * HALF)
    tl.store(dst + off1, out1.to(dtype), mask=mask)
    tl.store(dst + off2, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, cache_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr,
    num_q_heads, num_k_heads, q_tok_stride, q_head_stride, k_tok_stride, k_head_stride, cache_stride, eps,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr, APPLY_NORM: tl.constexpr, TORCH_ORDER: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    dtype = q_out_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    row = cache_ptr + pos * cache_stride
    # The unfused code casts cos/sin to the tensor dtype before multiplying.
    cos = tl.load(row + d, mask=d < HALF, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(row + HALF + d, mask=d < HALF, other=0.0).to(dtype).to(tl.float32)
    if block < q_blocks:
        _rotate_heads(q_ptr, q_out_ptr, qw_ptr, tok, block * BLOCK_H, num_q_heads, q_tok_stride, q_head_stride,
                      cos, sin, eps, HALF, BLOCK_D, BLOCK_H, IS_NEOX, APPLY_NORM, TORCH_ORDER)
    else:
        _rotate_heads(k_ptr, k_out_ptr, kw_ptr, tok, (block - q_blocks) * BLOCK_H, num_k_heads, k_tok_stride,
                      k_head_stride, cos, sin, eps, HALF, BLOCK_D, BLOCK_H, IS_NEOX, APPLY_NORM, TORCH_ORDER)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x [T, H * D] or [T, H, D] as a [T, H, D] view with unit stride along D."""
    return x.view(x.shape[0], -1, head_dim)


def _launch(positions, q, k, cos_sin_cache, head_dim, is_neox, q_weight=None, k_weight=None, eps=0.0):
    q3, k3 = _heads(q, head_dim), _heads(k, head_dim)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    num_tokens, num_q_heads, num_k_heads = q3.shape[0], q3.shape[1], k3.shape[1]
    if num_tokens == 0:
        return q_out, k_out
    block_h = min(_HEADS_PER_PROGRAM, triton.next_power_of_2(max(num_q_heads, num_k_heads)))
    grid = (num_tokens, triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_k_heads, block_h))
    apply_norm = q_weight is not None
    torch_order = apply_norm and head_dim == 128 and all(
        row_sum_layout(num_tokens * heads, head_dim) == _TORCH_ORDER_LAYOUT for heads in (num_q_heads, num_k_heads))
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    _rotary_kernel[grid](
        positions, cache, q3, k3, q_out, k_out,
        q_weight if apply_norm else q_out, k_weight if apply_norm else k_out,
        num_q_heads, num_k_heads, q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), cache.stride(0), eps,
        HALF=head_dim // 2, BLOCK_D=triton.next_power_of_2(head_dim // 2), BLOCK_H=block_h,
        IS_NEOX=is_neox, APPLY_NORM=apply_norm, TORCH_ORDER=torch_order, num_warps=4 if head_dim >= 128 else 2,
        # No FMAs: torch rounds each product to the tensor dtype before adding (and the compiler
        # would otherwise contract x1 * cos - x2 * sin straight through those roundings).
        enable_fp_fusion=False,
    )
    return q_out, k_out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_dim: int, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(positions, q, k, cos_sin_cache, head_dim, is_neox)


def qk_norm_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                   k_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor, head_dim: int,
                   is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(positions, q, k, cos_sin_cache, head_dim, is_neox,
                   q_weight.contiguous(), k_weight.contiguous(), eps)
