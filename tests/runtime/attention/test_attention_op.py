"""The attention op and the reference backend against a naive per-token computation."""
import math

import pytest
import torch

import runtime.attention.op  # noqa: F401  (registers graphmode::attention)
from runtime.attention import torch_backend
from runtime.attention.metadata import AttentionMetadata
from runtime.forward_context import set_forward_context
from runtime.ops.moe import fused_moe_reference

BS = 4


def _naive(q_rows, k_hist, v_hist, q_positions, scale, window):
    """One request: q_rows [q, h, d], k/v_hist [L, kvh, d]."""
    h, kvh = q_rows.shape[1], k_hist.shape[1]
    k = k_hist.repeat_interleave(h // kvh, dim=1)
    v = v_hist.repeat_interleave(h // kvh, dim=1)
    out = torch.empty_like(q_rows)
    for i, p in enumerate(q_positions):
        lo = 0 if window is None else max(0, p - window + 1)
        s = torch.einsum("hd,lhd->hl", q_rows[i], k[lo:p + 1]) * scale
        out[i] = torch.einsum("hl,lhd->hd", s.softmax(-1), v[lo:p + 1])
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_batch_matches_naive(window):
    torch.manual_seed(0)
    h, kvh, d = 6, 2, 8
    seq_lens, query_lens = [9, 1, 14, 1, 3], [9, 1, 4, 1, 3]  # prefill, decode, chunked prefill, decode, prefill
    num_blocks = 40
    perm = torch.randperm(num_blocks - 1) + 1
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // BS)
        tables.append(perm[used:used + n].tolist())
        used += n
    kv = torch.zeros(2, num_blocks, BS, kvh, d)
    hist_k = [torch.randn(s, kvh, d) for s in seq_lens]
    hist_v = [torch.randn(s, kvh, d) for s in seq_lens]
    # Put each request's cached prefix in the cache; the new tokens go through the op.
    for table, s, q, hk, hv in zip(tables, seq_lens, query_lens, hist_k, hist_v):
        for pos in range(s - q):
            kv[0, table[pos // BS], pos % BS] = hk[pos]
            kv[1, table[pos // BS], pos % BS] = hv[pos]
    pad = 3
    md = AttentionMetadata.build(query_lens, seq_lens, tables, BS, num_padded_tokens=sum(query_lens) + pad)
    new_k = torch.cat([hk[s - q:] for hk, s, q in zip(hist_k, seq_lens, query_lens)] + [torch.randn(pad, kvh, d)])
    new_v = torch.cat([hv[s - q:] for hv, s, q in zip(hist_v, seq_lens, query_lens)] + [torch.randn(pad, kvh, d)])
    q = torch.randn(sum(query_lens) + pad, h, d)
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(d)
    before_dummy = kv[:, 0].clone()
    with set_forward_context(md, {"l0": kv}):
        torch.ops.graphmode.attention(q, new_k, new_v, out, "l0", scale, window or 0)
    assert torch.equal(kv[:, 0], before_dummy), "padded rows (slot -1) must not write the cache"
    start = 0
    for s, ql, hk, hv in zip(seq_lens, query_lens, hist_k, hist_v):
        ref = _naive(q[start:start + ql], hk, hv, list(range(s - ql, s)), scale, window)
        torch.testing.assert_close(out[start:start + ql], ref, atol=1e-5, rtol=1e-5)
        start += ql
    assert torch.all(out[start:] == 0)


def test_op_without_context_fails_clearly():
    q = torch.randn(2, 2, 4)
    with pytest.raises(RuntimeError, match="no forward context"):
        torch.ops.graphmode.attention(q, q, q, torch.empty_like(q), "l0", 1.0, 0)


def test_store_kv_skips_padding():
    kv = torch.zeros(2, 3, BS, 1, 2)
    k = torch.ones(3, 1, 2)
    torch_backend.store_kv(k, 2 * k, kv, torch.tensor([5, -1, 0]))
    assert kv[0].flatten(0, 1)[5].eq(1).all() and kv[1].flatten(0, 1)[0].eq(2).all()
    assert kv.flatten(1, 2)[:, [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]].eq(0).all()


def test_fused_moe_matches_per_expert_loop():
    torch.manual_seed(0)
    t, hdim, inter, e, k = 11, 8, 6, 5, 2
    x = torch.randn(t, hdim)
    w13, w2 = torch.randn(e, 2 * inter, hdim), torch.randn(e, hdim, inter)
    weights, ids = torch.rand(t, e).topk(k, dim=-1)
    ref = torch.zeros(t, hdim)
    for tok in range(t):
        for j in range(k):
            g, u = (w13[ids[tok, j]] @ x[tok]).chunk(2)
            ref[tok] += weights[tok, j] * (w2[ids[tok, j]] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(fused_moe_reference(x, w13, w2, weights, ids), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.ops.graphmode.fused_moe(x, w13, w2, weights, ids), ref, atol=1e-4, rtol=1e-4)
