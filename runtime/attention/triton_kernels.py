"""Triton attention backend: KV-cache store and paged attention (same API as torch_backend).

The kernels live in triton_decode.py (uniform decode, CUDA-graph safe) and triton_prefill.py
(varlen causal prefill and mixed batches); this module picks between them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.attention.metadata import AttentionMetadata
from runtime.attention.triton_decode import paged_decode
from runtime.attention.triton_prefill import paged_prefill
from runtime.ops.kernels import reference_asked_for

__all__ = ["store_kv", "paged_attention", "store_kv_and_attend"]

STORE_KV_AND_ATTEND = "store_kv_and_attend"


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, kv_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kv, stride_cb, stride_co, stride_ch, stride_cd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    dst = (kv_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co
           + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd)
    k = tl.load(key_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write new keys/values [T, KVH, D] into their slots; rows with slot -1 are skipped."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    # Rows without a slot_mapping entry are padding too (one launch size per padded T).
    num_tokens = min(key.shape[0], slot_mapping.shape[0])
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )


def store_kv_and_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                        metadata: AttentionMetadata, scale: float, sliding_window: int | None,
                        out: torch.Tensor) -> None:
    """store_kv, then paged_attention; for uniform decode both in the decode kernel (one launch less per
    layer and step). ``GRAPHMODE_OP_KERNELS=store_kv_and_attend=torch`` keeps them apart (to compare)."""
    in_kernel = (metadata.max_query_len <= 1 and key.stride(-1) == 1 and value.stride(-1) == 1
                 and not reference_asked_for(STORE_KV_AND_ATTEND))
    if not in_kernel:
        store_kv(key, value, kv_cache, metadata.slot_mapping)
    _attend(query, kv_cache, metadata, scale, sliding_window, out,
            (key, value, metadata.slot_mapping) if in_kernel else None)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    sliding_window: int | None, out: torch.Tensor) -> None:
    """Causal attention of each request's new queries [T, H, D] over its paged KV history."""
    _attend(query, kv_cache, metadata, scale, sliding_window, out, None)


def _attend(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
            sliding_window: int | None, out: torch.Tensor,
            new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
    """paged_attention; ``new_kv`` (decode only): the step's keys, values and slots, stored by the decode kernel."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = kv_cache.shape[3]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if kv_cache.shape[4] != head_dim or metadata.block_size != kv_cache.shape[2]:
        raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} does not match query head_dim {head_dim} "
                         f"/ block_size {metadata.block_size}")
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    if metadata.max_query_len <= 1:
        # Launch depends on shapes only, so this branch can be captured in a CUDA graph.
        paged_decode(query, kv_cache, metadata.block_tables, metadata.seq_lens, metadata.block_size,
                     scale, sliding_window, out, new_kv=new_kv)
        return
    paged_prefill(query, kv_cache, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
                  metadata.max_query_len, metadata.block_size, scale, sliding_window, out)
    if out.shape[0] > metadata.num_actual_tokens:
        out[metadata.num_actual_tokens:].zero_()
