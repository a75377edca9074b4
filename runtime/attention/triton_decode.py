"""Paged decode attention (one query per sequence) in Triton, safe to capture in a CUDA graph.

Everything that shapes the launch (grid, constexprs, split count, scratch sizes) comes from
tensor shapes only; per-step values (sequence lengths, block tables) are read on the device.
So a graph captured for a padded batch size stays valid while the metadata tensors are
updated in place.

One program handles all query heads that share a KV head (GQA group), so each K/V tile is
loaded once per KV head rather than once per query head. When there are too few
(sequence, KV head) programs to fill the GPU, the KV range is split (flash-decoding) and a
second kernel merges the partial results.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from runtime.platforms import current_platform

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 16
# A split shorter than this (in cache capacity) costs more in the merge than it saves.
_MIN_TOKENS_PER_SPLIT = 256
_NO_WINDOW = 1 << 30


@triton.jit
def online_softmax_update(acc, l_i, m_i, s, q, v, DOT_PRECISION: tl.constexpr):
    """Fold one KV tile into the running (acc, l_i, m_i): ``s`` [M, N] are its scores in log2 units
    (-inf where hidden), ``v`` [N, D] its values; products run in q's dtype."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def online_softmax_step(acc, l_i, m_i, s, q, v_ptrs, v_mask, DOT_PRECISION: tl.constexpr):
    """online_softmax_update with the tile's values read from ``v_ptrs``/``v_mask`` (shared by the decode
    and the prefill kernels)."""
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    return online_softmax_update(acc, l_i, m_i, s, q, v, DOT_PRECISION)


@triton.jit
def _new_token_tile(cache_tile, new_ptr, is_new, offs_d, d_mask):
    """``cache_tile`` [N, D] with the row of the step's new token (``is_new`` [N]) taken from ``new_ptr``
    instead, rounded to the cache's dtype as storing it would round it."""
    new = tl.load(new_ptr + offs_d[None, :] + 0 * is_new[:, None], mask=is_new[:, None] & d_mask[None, :], other=0.0)
    return tl.where(is_new[:, None], new.to(cache_tile.dtype), cache_tile)


@triton.jit
def _decode_kernel(
    q_ptr, kv_ptr, out_ptr, bt_ptr, seq_lens_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    key_ptr, value_ptr, slot_ptr, num_slots,
    num_seqs, max_blocks, scale_log2, window,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kv, stride_kb, stride_ko, stride_kh, stride_kd,
    stride_bt, stride_nt, stride_nh, stride_vt, stride_vh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, STORE_KV: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # Rows past the block table (padding the caller did not cover) behave like seq_len 0.
    seq_len = tl.load(seq_lens_ptr + row, mask=row < num_seqs, other=0)
    # Clamp so a bad seq_len cannot walk off the block table (a fault inside a graph is fatal).
    seq_len = tl.minimum(seq_len, max_blocks * BLOCK_SIZE)
    lo = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM

    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    # Finite stand-in for -inf as the running max: a fully masked tile then yields p = 0 and
    # alpha = 1 instead of exp(-inf - -inf) = NaN.
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + row.to(tl.int64) * stride_bt
    kv_head = kv_ptr + kvh * stride_kh
    # STORE_KV: this step's key/value (the sequence's last position) come in key_ptr/value_ptr; the
    # program whose split holds that position writes them to their cache slot and reads them from
    # registers, not back from the cache, so nothing waits on its own store.
    last = seq_len - 1
    new_slot = -1
    if STORE_KV:
        new_slot = tl.load(slot_ptr + row, mask=row < num_slots, other=-1).to(tl.int64)
        new_k = key_ptr + row.to(tl.int64) * stride_nt + kvh * stride_nh
        new_v = value_ptr + row.to(tl.int64) * stride_vt + kvh * stride_vh
        if (new_slot >= 0) & (start <= last) & (last < end):
            dst = (kv_head + (new_slot // BLOCK_SIZE) * stride_kb + (new_slot % BLOCK_SIZE) * stride_ko
                   + offs_d * stride_kd)
            tl.store(dst, tl.load(new_k + offs_d, mask=d_mask).to(kv_ptr.dtype.element_ty), mask=d_mask)
            tl.store(dst + stride_kv, tl.load(new_v + offs_d, mask=d_mask).to(kv_ptr.dtype.element_ty), mask=d_mask)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok = blk * stride_kb + (pos % BLOCK_SIZE) * stride_ko
        kv_off = tok[:, None] + offs_d[None, :] * stride_kd
        kv_mask = n_mask[:, None] & d_mask[None, :]
        if STORE_KV:
            is_new = (pos == last) & (new_slot >= 0)
            from_cache = kv_mask & (~is_new[:, None])
            k = _new_token_tile(tl.load(kv_head + kv_off, mask=from_cache, other=0.0), new_k, is_new, offs_d, d_mask)
            v = _new_token_tile(tl.load(kv_head + stride_kv + kv_off, mask=from_cache, other=0.0), new_v, is_new,
                                offs_d, d_mask)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(n_mask[None, :], s, float("-inf"))
            acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, s, q, v, DOT_PRECISION)
        else:
            k = tl.load(kv_head + kv_off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(n_mask[None, :], s, float("-inf"))
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, q, kv_head + stride_kv + kv_off, kv_mask,
                                                DOT_PRECISION)

    if NUM_SPLITS == 1:
        # l_i == 0 only for empty sequences, whose acc is 0: they come out as zeros.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        # Every (row, head, split) is written, empty ones included, so the merge never reads
        # uninitialised scratch.
        idx = (row * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + idx[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_m_ptr + idx, m_i, mask=g_mask)
        tl.store(part_l_ptr + idx, l_i, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr,
    stride_ot, stride_oh, stride_od,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    idx = (row * NUM_HEADS + head) * NUM_SPLITS + offs_s
    m = tl.load(part_m_ptr + idx)
    l = tl.load(part_l_ptr + idx)
    acc = tl.load(part_acc_ptr + idx[:, None] * BLOCK_D + offs_d[None, :])
    w = tl.exp2(m - tl.max(m, 0))
    denom = tl.sum(w * l, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    count = current_platform.multiprocessor_count(device)
    # None: interpreter runs on CPU tensors; pretend to be an H100 so the split path gets exercised.
    return count if count is not None else 132


def choose_num_splits(num_rows: int, num_kv_heads: int, max_blocks: int, block_size: int,
                      device: torch.device) -> int:
    """Power-of-two split count from shapes only (never from per-step lengths)."""
    programs = max(num_rows * num_kv_heads, 1)
    target = 2 * _sm_count(device)
    capacity = max_blocks * block_size
    splits = 1
    while (splits * 2 <= _MAX_SPLITS and programs * splits * 2 <= target
           and capacity // (splits * 2) >= _MIN_TOKENS_PER_SPLIT):
        splits *= 2
    return splits


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 callers (tests, references) expect fp32 accuracy, not TF32's 10-bit mantissa.
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, block_size: int, scale: float, sliding_window: int | None,
                 out: torch.Tensor, num_splits: int | None = None,
                 new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Decode attention: query row i belongs to sequence i (block_tables/seq_lens row i).

    Rows with seq_len 0, or beyond block_tables.shape[0], get zeros. ``new_kv`` (key, value [T, KVH, D]
    with unit stride in D, slot_mapping [<= T]): this step's keys and values, stored into their slots by
    the same kernel (as store_kv would store them; rows without a slot, or with slot -1, store nothing).
    """
    num_rows, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    num_seqs, max_blocks = block_tables.shape
    if num_rows == 0:
        return
    if num_splits is None:
        num_splits = choose_num_splits(num_rows, num_kv_heads, max_blocks, block_size, query.device)
    block_d = triton.next_power_of_2(head_dim)
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    block_n = 64 if block_d <= 128 else 32
    window = _NO_WINDOW if sliding_window is None else sliding_window
    if num_splits > 1:
        part_acc = torch.empty(num_rows * num_heads * num_splits * block_d, dtype=torch.float32, device=query.device)
        part_m = torch.empty(num_rows * num_heads * num_splits, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused: the NUM_SPLITS == 1 branch writes out directly
    key, value, slots = new_kv if new_kv is not None else (query, query, seq_lens)  # unused without STORE_KV
    _decode_kernel[(num_rows, num_kv_heads, num_splits)](
        query, kv_cache, out, block_tables, seq_lens, part_acc, part_m, part_l,
        key, value, slots, min(slots.shape[0], num_rows),
        num_seqs, max_blocks, scale * _LOG2E, window,
        query.stride(0), query.stride(1), query.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        block_tables.stride(0), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits, DOT_PRECISION=dot_precision(query.dtype), STORE_KV=new_kv is not None,
        num_warps=4,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_rows, num_heads)](
            part_acc, part_m, part_l, out,
            out.stride(0), out.stride(1), out.stride(2),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            num_warps=1 if block_d <= 64 else 2,
        )
