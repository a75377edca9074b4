"""Varlen causal attention over the paged KV cache, for prefill and mixed batches.

Grid: (sequence, KV head, query tile). A tile's rows pack BLOCK_Q query tokens times the
GROUP query heads of one KV head (row m -> token m // GROUP, head m % GROUP), so K/V tiles
are loaded once per KV head and a GQA group of 3 does not get padded to 4. Decode rows in a
mixed batch are just sequences with one query token. The new tokens' K/V must already be in
the cache (store_kv runs first).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.attention.triton_decode import _LOG2E, _NO_WINDOW, dot_precision, online_softmax_step


@triton.jit
def _attend_tile(acc, l_i, m_i, q, kv_head, bt_row, n0, kv_hi, q_pos, window, scale_log2,
                 offs_n, offs_d, d_mask, stride_kv, stride_kb, stride_ko, stride_kd,
                 BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pos = n0 + offs_n
    if MASKED:
        n_mask = pos < kv_hi
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        # Interior tiles lie wholly inside the sequence: no row mask, so loads vectorise.
        blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        kv_mask = d_mask[None, :]
    tok = blk * stride_kb + (pos % BLOCK_SIZE) * stride_ko
    kv_off = tok[:, None] + offs_d[None, :] * stride_kd
    k = tl.load(kv_head + kv_off, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = (n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
                   & (pos[None, :] > q_pos[:, None] - window))
        s = tl.where(visible, s, float("-inf"))
    return online_softmax_step(acc, l_i, m_i, s, q, kv_head + stride_kv + kv_off, kv_mask, DOT_PRECISION)


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, out_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
    max_blocks, scale_log2, window,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kv, stride_kb, stride_ko, stride_kh, stride_kd,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)

    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    # The grid is sized by the longest query; shorter sequences leave tiles idle.
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), max_blocks * BLOCK_SIZE)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q_local = tile * BLOCK_Q + offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    m_mask = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
    d_mask = offs_d < HEAD_DIM
    q_pos = context_len + q_local
    q_rows = (q_start + q_local).to(tl.int64)

    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    # Keys the tile can see span [kv_lo, kv_hi). Those in [full_lo, full_hi) are visible to
    # every row, so their tiles skip the causal/window masks; only the edges pay for them.
    first_pos = context_len + tile * BLOCK_Q
    kv_hi = context_len + tl.minimum((tile + 1) * BLOCK_Q, q_len)
    kv_lo = tl.maximum(first_pos - window + 1, 0)
    full_lo = tl.maximum(kv_hi - window, 0)
    full_hi = first_pos + 1
    a_end = tl.minimum(kv_lo + tl.cdiv(full_lo - kv_lo, BLOCK_N) * BLOCK_N, kv_hi)
    b_end = a_end + tl.maximum(full_hi - a_end, 0) // BLOCK_N * BLOCK_N

    # Finite initial max: rows whose keys are all masked in a tile stay NaN-free.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    kv_head = kv_ptr + kvh * stride_kh
    for n0 in range(kv_lo, a_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, kv_head, bt_row, n0, kv_hi, q_pos, window, scale_log2,
                                     offs_n, offs_d, d_mask, stride_kv, stride_kb, stride_ko, stride_kd,
                                     BLOCK_SIZE, True, DOT_PRECISION)
    for n0 in range(a_end, b_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, kv_head, bt_row, n0, kv_hi, q_pos, window, scale_log2,
                                     offs_n, offs_d, d_mask, stride_kv, stride_kb, stride_ko, stride_kd,
                                     BLOCK_SIZE, False, DOT_PRECISION)
    for n0 in range(b_end, kv_hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, kv_head, bt_row, n0, kv_hi, q_pos, window, scale_log2,
                                     offs_n, offs_d, d_mask, stride_kv, stride_kb, stride_ko, stride_kd,
                                     BLOCK_SIZE, True, DOT_PRECISION)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                  block_size: int, scale: float, sliding_window: int | None, out: torch.Tensor) -> None:
    """Rows outside every request's query range are left untouched."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    num_seqs, max_blocks = block_tables.shape
    if num_seqs == 0 or max_query_len <= 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    # 64 rows keeps the fp32 accumulator within registers at head_dim 256 on 4 warps.
    block_m = max(64, triton.next_power_of_2(group))
    block_q = block_m // group
    block_n = 64 if block_d <= 128 else 32
    window = _NO_WINDOW if sliding_window is None else sliding_window
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len, block_q))
    _prefill_kernel[grid](
        query, kv_cache, out, block_tables, seq_lens, query_start_loc,
        max_blocks, scale * _LOG2E, window,
        query.stride(0), query.stride(1), query.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=4 if block_d <= 128 else 8, num_stages=2,
    )
