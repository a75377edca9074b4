"""Triton rotary embedding, optionally preceded by a per-head RMSNorm (CUDA; imported lazily).

One launch for q and k: grid (tokens, head blocks of q then head blocks of k). Each program loads
a [heads, head_dim / 2] tile of each rotation half, so the cos/sin row of its token is read once.
Values are rounded to the tensor dtype where the unfused torch code rounds them, and the q/k norm
sums its squares in torch's order (runtime/ops/reduction_order.py) wherever norm_sum_layout covers
the shape, so the fused op is bit-identical to the unfused ones there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.ops.reduction_order import RowSumLayout, row_sum_layout
from runtime.ops.triton_lane_tree import lane_tree_sum

__all__ = ["rotary_embedding", "qk_norm_rotary", "norm_sum_layout"]

_HEADS_PER_PROGRAM = 4


@triton.jit
def _row_in_element_order(s1, s2, IS_NEOX: tl.constexpr):
    """The two rotary halves [H, D / 2] of a head put back as its row [H, D] in element order."""
    both = tl.join(s1, s2)  # [H, D / 2, 2]
    if IS_NEOX:  # halves are elements 0..D/2-1 and D/2..D-1
        both = tl.permute(both, (0, 2, 1))
    # gpt-j: halves are the even and odd elements, which the join already interleaves
    return tl.reshape(both, [s1.shape[0], 2 * s1.shape[1]])


@triton.jit
def _combine_four(a):
    """[H, LANES, 4] -> [H, LANES]: the four accumulators added left to right."""
    lo, hi = tl.split(tl.reshape(a, [a.shape[0], a.shape[1], 2, 2]))  # positions (0, 2) and (1, 3)
    p0, p2 = tl.split(lo)
    p1, p3 = tl.split(hi)
    return ((p0 + p1) + p2) + p3


@triton.jit
def _head_sum_squares_torch_order(x1, x2, IS_NEOX: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """Per-head sum of squares in torch's order (runtime/ops/reduction_order.py), for one load per
    lane (VEC 4: lane t sums elements 4t..4t+3) or up to four elements per lane (VEC 1: element
    i * LANES + t into accumulator i); then the lanes halve down to one."""
    sq = _row_in_element_order(x1 * x1, x2 * x2, IS_NEOX)
    heads: tl.constexpr = sq.shape[0]
    per_lane: tl.constexpr = sq.shape[1] // LANES
    if VEC == 4:
        v = _combine_four(tl.reshape(sq, [heads, LANES, 4]))
    elif per_lane == 1:
        v = sq
    else:  # [H, per_lane, LANES] -> [H, LANES, per_lane]: accumulator i along the last axis
        acc = tl.permute(tl.reshape(sq, [heads, per_lane, LANES]), (0, 2, 1))
        if per_lane == 2:
            a0, a1 = tl.split(acc)
            v = a0 + a1
        else:
            v = _combine_four(acc)
    return lane_tree_sum(v, LANES)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, w_ptr, tok, head0, num_heads, tok_stride, head_stride, cos, sin, eps,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr, APPLY_NORM: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
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
        if LANES > 0:
            sum_sq = _head_sum_squares_torch_order(x1, x2, IS_NEOX, LANES, VEC)
        else:
            sum_sq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        mean_sq = sum_sq / (2 * HALF)  # a power of two when LANES > 0: the same as torch's * (1 / n)
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
    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, IS_NEOX: tl.constexpr, APPLY_NORM: tl.constexpr,
    Q_LANES: tl.constexpr, Q_VEC: tl.constexpr, K_LANES: tl.constexpr, K_VEC: tl.constexpr,
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
                      cos, sin, eps, HALF, BLOCK_D, BLOCK_H, IS_NEOX, APPLY_NORM, Q_LANES, Q_VEC)
    else:
        _rotate_heads(k_ptr, k_out_ptr, kw_ptr, tok, (block - q_blocks) * BLOCK_H, num_k_heads, k_tok_stride,
                      k_head_stride, cos, sin, eps, HALF, BLOCK_D, BLOCK_H, IS_NEOX, APPLY_NORM, K_LANES, K_VEC)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x [T, H * D] or [T, H, D] as a [T, H, D] view with unit stride along D."""
    return x.view(x.shape[0], -1, head_dim)


def norm_sum_layout(rows: int, head_dim: int) -> RowSumLayout | None:
    """torch's row-sum layout for the q or k norm (rows = tokens x heads) where the kernel follows it,
    or None where it sums in its own order: heads that are not a power of two, or whose lanes would
    take more than one vector each (_head_sum_squares_torch_order covers one load per lane)."""
    layout = row_sum_layout(rows, head_dim)
    if layout is None or head_dim & (head_dim - 1) or layout.lanes > 128:
        return None
    if layout.vec == 4 and head_dim != 4 * layout.lanes:
        return None
    return layout


def _lanes_and_vec(layout: RowSumLayout | None) -> tuple[int, int]:
    return (layout.lanes, layout.vec) if layout else (0, 0)


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
    q_lanes, q_vec = _lanes_and_vec(norm_sum_layout(num_tokens * num_q_heads, head_dim) if apply_norm else None)
    k_lanes, k_vec = _lanes_and_vec(norm_sum_layout(num_tokens * num_k_heads, head_dim) if apply_norm else None)
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    _rotary_kernel[grid](
        positions, cache, q3, k3, q_out, k_out,
        q_weight if apply_norm else q_out, k_weight if apply_norm else k_out,
        num_q_heads, num_k_heads, q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), cache.stride(0), eps,
        HALF=head_dim // 2, BLOCK_D=triton.next_power_of_2(head_dim // 2), BLOCK_H=block_h,
        IS_NEOX=is_neox, APPLY_NORM=apply_norm, Q_LANES=q_lanes, Q_VEC=q_vec, K_LANES=k_lanes, K_VEC=k_vec,
        num_warps=4 if head_dim >= 128 else 2,
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
