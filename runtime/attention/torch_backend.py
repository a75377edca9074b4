"""Reference paged attention in plain torch: runs on any device, correct for mixed batches.

Decode rows (one query each) are computed together in one masked batch; prefill rows, which
are few per step, one request at a time. Speed is not the point here; the Triton backend is.
The math is written out (no SDPA): on CPU, SDPA's fixed cost dwarfs these small problems.
"""
from __future__ import annotations

import torch

from runtime.attention.metadata import AttentionMetadata


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write new keys/values into their slots; padded rows (slot -1) are skipped."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    slots = slot_mapping[: key.shape[0]]
    valid = slots >= 0
    slots = slots[valid]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key[valid].to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value[valid].to(kv_cache.dtype))


def _gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int, block_size: int):
    """K and V of one or more sequences: [..., length, num_kv_heads, head_dim]."""
    pos = torch.arange(length, device=kv_cache.device)
    slots = block_table[..., pos // block_size].long() * block_size + pos % block_size
    flat = kv_cache.flatten(1, 2)  # [2, num_slots, kvh, d]
    return flat[0][slots], flat[1][slots]


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    return mask


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [B, Q, H, D], k/v [B, L, KVH, D], mask [B, Q, L] -> [B, Q, H, D]; grouped-query aware."""
    b, nq, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, nq, kvh, h // kvh, d).float()
    scores = torch.einsum("bqkgd,blkd->bkgql", qg, k.float()) * scale
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    out = torch.einsum("bkgql,blkd->bqkgd", scores.softmax(dim=-1), v.float())
    return out.reshape(b, nq, h, d)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
) -> None:
    """Causal attention of each request's new queries over its whole cached history."""
    query_lens = metadata.query_lens_cpu
    seq_lens = metadata.seq_lens_cpu
    if query_lens is None or seq_lens is None:
        starts = metadata.query_start_loc.tolist()
        query_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
        seq_lens = metadata.seq_lens.tolist()
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    decode_rows = [i for i, q in enumerate(query_lens) if q == 1]
    if decode_rows:
        _decode(query, kv_cache, metadata, scale, sliding_window, out, decode_rows, starts, seq_lens)
    for i, q_len in enumerate(query_lens):
        if q_len > 1:
            _prefill_one(query, kv_cache, metadata, scale, sliding_window, out, i, starts[i], q_len, seq_lens[i])
    if out.shape[0] > starts[-1]:
        out[starts[-1]:].zero_()


def _decode(query, kv_cache, metadata, scale, sliding_window, out, rows, starts, seq_lens) -> None:
    device = query.device
    lengths = torch.tensor([seq_lens[i] for i in rows], device=device)
    max_len = max(seq_lens[i] for i in rows)
    tables = metadata.block_tables[torch.tensor(rows, device=device)]
    k, v = _gather_kv(kv_cache, tables, max_len, metadata.block_size)  # [S, L, kvh, d]
    token_rows = torch.tensor([starts[i] for i in rows], device=device)
    k_pos = torch.arange(max_len, device=device)
    mask = _window_mask((lengths - 1)[:, None], k_pos[None, :], sliding_window) & (k_pos[None, :] < lengths[:, None])
    o = _masked_attention(query[token_rows].unsqueeze(1), k, v, mask[:, None, :], scale)
    out[token_rows] = o.squeeze(1).to(out.dtype)


def _prefill_one(query, kv_cache, metadata, scale, sliding_window, out, i, start, q_len, seq_len) -> None:
    k, v = _gather_kv(kv_cache, metadata.block_tables[i], seq_len, metadata.block_size)  # [L, kvh, d]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
    k_pos = torch.arange(seq_len, device=query.device)
    mask = _window_mask(q_pos[:, None], k_pos[None, :], sliding_window)
    o = _masked_attention(query[start:start + q_len][None], k[None], v[None], mask[None], scale)
    out[start:start + q_len] = o[0].to(out.dtype)
