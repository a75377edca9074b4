"""Triton paged attention vs a naive float32 reference.

Runs on CUDA by default. With TRITON_INTERPRET=1 it runs the same comparisons on CPU through
the Triton interpreter (smaller shapes, no bf16: the interpreter mis-handles it);
GRAPHMODE_TEST_DEVICE overrides the device either way.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from runtime.attention.metadata import AttentionMetadata

from tests.gpu import triton_device  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = triton_device.select(__name__)
INTERPRET = triton_device.INTERPRET


def _fix_interpreter_scalars() -> None:
    # The interpreter keeps scalars as 1-element arrays and int()s them for range(); NumPy >= 2.4
    # refuses to convert a 1-d array, so loops with loaded bounds would fail.
    import numpy as np
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_graphmode_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._graphmode_fixed = True
    interp._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_scalars()

from runtime.attention import triton_kernels  # noqa: E402
from runtime.attention.triton_decode import choose_num_splits, paged_decode  # noqa: E402

BLOCK_SIZE = 16
DTYPES = [torch.float32, torch.float16] if INTERPRET else [torch.bfloat16, torch.float16, torch.float32]
# (num_heads, num_kv_heads, head_dim): SmolLM2, Llama-3.2-1B, and a head_dim-128 model.
HEAD_CONFIGS = [(9, 3, 64), (32, 8, 64), (16, 8, 128)]
DECODE_BATCHES = [1, 3, 8] if INTERPRET else [1, 3, 64]
MAX_SEQ = 100 if INTERPRET else 300


def _tol(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]


def _build_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, seed, num_padded_tokens=None):
    """Random cache and queries. Slots outside every history are NaN, so reading one shows."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_needed = [max(1, math.ceil(s / BLOCK_SIZE)) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, i = [], 0
    for n in blocks_needed:
        tables.append(ids[i:i + n])
        i += n
    kv_cache = torch.full((2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), float("nan"))
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    # Cached prefixes get random K/V; the new tokens' slots are filled by store_kv.
    prefix_slots = [table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
                    for q_len, s_len, table in zip(query_lens, seq_lens, tables) for pos in range(s_len - q_len)]
    flat[:, prefix_slots] = torch.randn(2, len(prefix_slots), num_kv_heads, head_dim, generator=gen)
    md = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE, device=DEVICE,
                                 num_padded_tokens=num_padded_tokens)
    num_tokens = md.slot_mapping.shape[0]
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    to = dict(device=DEVICE, dtype=dtype)
    return md, kv_cache.to(**to), query.to(**to), key.to(**to), value.to(**to)


def _reference(query, kv_cache, md, scale, sliding_window):
    """Per-sequence causal attention in float32 from each sequence's gathered K/V."""
    num_kv_heads, head_dim = kv_cache.shape[3:]
    group = query.shape[1] // num_kv_heads
    flat = kv_cache.float().reshape(2, -1, num_kv_heads, head_dim)
    starts = md.query_start_loc.tolist()
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for i, s_len in enumerate(md.seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        if end == start or s_len == 0:
            continue
        pos = torch.arange(s_len, device=query.device)
        table = md.block_tables[i].long()
        slots = table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        k = flat[0][slots].repeat_interleave(group, dim=1)  # [L, H, D]
        v = flat[1][slots].repeat_interleave(group, dim=1)
        q = query[start:end].float()
        q_pos = torch.arange(s_len - (end - start), s_len, device=query.device)
        mask = pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= pos[None, :] > q_pos[:, None] - sliding_window
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def _run_and_check(md, kv_cache, query, key, value, sliding_window=None, num_splits=None):
    dtype = query.dtype
    scale = query.shape[-1] ** -0.5
    ref_cache = kv_cache.clone()
    valid = md.slot_mapping >= 0
    ref_flat = ref_cache.view(2, -1, *kv_cache.shape[3:])
    ref_flat[0, md.slot_mapping[valid]] = key[valid]
    ref_flat[1, md.slot_mapping[valid]] = value[valid]

    triton_kernels.store_kv(key, value, kv_cache, md.slot_mapping)
    assert torch.equal(kv_cache.nan_to_num(123.0), ref_cache.nan_to_num(123.0)), "store_kv mismatch"

    out = torch.full_like(query, float("nan"))
    if num_splits is None:
        triton_kernels.paged_attention(query, kv_cache, md, scale, sliding_window, out)
    else:
        paged_decode(query, kv_cache, md.block_tables, md.seq_lens, md.block_size, scale, sliding_window,
                     out, num_splits=num_splits)
    ref = _reference(query, kv_cache, md, scale, sliding_window)
    tol = _tol(dtype) * max(1.0, ref.abs().max().item())
    n = md.num_actual_tokens
    torch.testing.assert_close(out[:n].float(), ref[:n], atol=tol, rtol=_tol(dtype))
    assert torch.all(out[n:] == 0), "padded rows must be zero"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=lambda h: f"h{h[0]}kv{h[1]}d{h[2]}")
@pytest.mark.parametrize("batch", DECODE_BATCHES)
def test_decode(batch, heads, dtype):
    rng = random.Random(batch)
    seq_lens = [rng.randint(1, MAX_SEQ) for _ in range(batch)]
    _run_and_check(*_build_batch([1] * batch, seq_lens, *heads, dtype, seed=batch))


@pytest.mark.parametrize("num_splits", [1, 2, 8])
@pytest.mark.parametrize("sliding_window", [None, 5, 40])
def test_decode_splits(num_splits, sliding_window):
    rng = random.Random(num_splits)
    seq_lens = [1, 2, 17, 64, MAX_SEQ] + [rng.randint(1, MAX_SEQ) for _ in range(3)]
    batch = _build_batch([1] * len(seq_lens), seq_lens, 9, 3, 64, DTYPES[0], seed=7)
    _run_and_check(*batch, sliding_window=sliding_window, num_splits=num_splits)


def test_split_choice_depends_on_shapes_only():
    dev = torch.device("cuda") if DEVICE.type == "cuda" else DEVICE
    # Batch-1 decode with a long table splits; a full batch does not.
    assert choose_num_splits(1, 8, 256, 16, dev) > 1
    assert choose_num_splits(64, 8, 256, 16, dev) == 1
    # Short tables are not worth splitting.
    assert choose_num_splits(1, 8, 8, 16, dev) == 1


@pytest.mark.parametrize("pad_tables", [True, False])
def test_decode_padded(pad_tables):
    dtype = DTYPES[0]
    seq_lens = [5, 33, 70]
    padded = 8
    md, kv_cache, query, key, value = _build_batch([1] * 3, seq_lens, 32, 8, 64, dtype, seed=3,
                                                   num_padded_tokens=padded)
    if pad_tables:
        # What a CUDA-graph runner does: metadata sized for the padded batch, seq_len 0 rows.
        extra = padded - len(seq_lens)
        md.block_tables = torch.cat([md.block_tables, torch.zeros_like(md.block_tables[:1]).expand(extra, -1)])
        md.seq_lens = torch.cat([md.seq_lens, torch.zeros(extra, dtype=torch.int32, device=DEVICE)])
        md.query_start_loc = torch.cat([md.query_start_loc, md.query_start_loc[-1:].expand(extra)])
    _run_and_check(md, kv_cache, query, key, value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=lambda h: f"h{h[0]}kv{h[1]}d{h[2]}")
@pytest.mark.parametrize("sliding_window", [None, 24])
def test_mixed_batch(heads, dtype, sliding_window):
    # Prefill with and without cached prefixes, interleaved with decode rows, plus padding.
    query_lens = [1, 37, 1, 5, 70, 1]
    seq_lens = [40, 37, 1, 90, 75, 12]
    if not INTERPRET:
        query_lens += [200, 1, 130]
        seq_lens += [300, 257, 130]
    batch = _build_batch(query_lens, seq_lens, *heads, dtype, seed=11, num_padded_tokens=sum(query_lens) + 5)
    _run_and_check(*batch, sliding_window=sliding_window)


@pytest.mark.parametrize("sliding_window", [None, 150])
@pytest.mark.parametrize("heads", [(8, 2, 64), (9, 3, 64)], ids=lambda h: f"h{h[0]}kv{h[1]}d{h[2]}")
def test_prefill_long_prefix(heads, sliding_window):
    # Long histories give query tiles unmasked interior KV tiles between the masked edges.
    batch = _build_batch([40, 1, 130], [300, 290, 130], *heads, DTYPES[0], seed=13)
    _run_and_check(*batch, sliding_window=sliding_window)


HEAD_DIMS = [80, 96] if INTERPRET else [32, 80, 96, 256]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(head_dim):
    dtype = torch.float16
    _run_and_check(*_build_batch([1, 1, 1], [3, 50, 20], 8, 2, head_dim, dtype, seed=head_dim))
    _run_and_check(*_build_batch([1, 20, 9], [30, 20, 60], 8, 2, head_dim, dtype, seed=head_dim + 1))


@pytest.mark.parametrize("group", [1, 16, 32, 128])
def test_gqa_groups(group):
    # MHA and wide groups: > 16 widens the decode tile, > 64 the prefill one (one token per tile).
    dtype = torch.float16
    _run_and_check(*_build_batch([1, 1], [20, 70], 2 * group, 2, 64, dtype, seed=group))
    _run_and_check(*_build_batch([1, 10], [20, 70], 2 * group, 2, 64, dtype, seed=group + 1))


def test_store_kv_skips_padding_and_strided_inputs():
    dtype = DTYPES[0]
    num_kv_heads, head_dim, num_blocks = 3, 64, 4
    kv_cache = torch.zeros(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    slots = torch.tensor([5, -1, 17, 63, -1, 0], dtype=torch.int64, device=DEVICE)
    # K and V as views into a fused qkv projection output: not contiguous per token.
    qkv = torch.randn(7, 4 * num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    key, value = qkv[:, :num_kv_heads], qkv[:, 2 * num_kv_heads:3 * num_kv_heads]
    triton_kernels.store_kv(key, value, kv_cache, slots)  # 7 rows, 6 slots: the 7th is padding
    expected = torch.zeros_like(kv_cache)
    flat = expected.view(2, -1, num_kv_heads, head_dim)
    valid = slots >= 0
    flat[0, slots[valid]] = key[:6][valid]
    flat[1, slots[valid]] = value[:6][valid]
    assert torch.equal(kv_cache, expected)


def _store_then_attend(md, kv_cache, query, key, value, sliding_window, num_splits):
    cache, out = kv_cache.clone(), torch.full_like(query, float("nan"))
    triton_kernels.store_kv(key, value, cache, md.slot_mapping)
    paged_decode(query, cache, md.block_tables, md.seq_lens, md.block_size, query.shape[-1] ** -0.5,
                 sliding_window, out, num_splits=num_splits)
    return cache, out


def _stored_by_attention(md, kv_cache, query, key, value, sliding_window, num_splits):
    cache, out = kv_cache.clone(), torch.full_like(query, float("nan"))
    paged_decode(query, cache, md.block_tables, md.seq_lens, md.block_size, query.shape[-1] ** -0.5,
                 sliding_window, out, num_splits=num_splits, new_kv=(key, value, md.slot_mapping))
    return cache, out


@pytest.mark.parametrize("num_splits", [1, 2, 8])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_storing_the_new_kv_equals_store_then_decode(num_splits, sliding_window, padded):
    # The fused store reads the new token from registers: outputs and cache must be the unfused ones, bit for bit.
    seq_lens = [1, 2, 17, 64, MAX_SEQ, 33]
    md, kv_cache, query, key, value = _build_batch([1] * len(seq_lens), seq_lens, 9, 3, 64, DTYPES[-1], seed=5,
                                                   num_padded_tokens=8 if padded else None)
    if padded:  # a graph runner's padding: seq_len 0 rows beyond the batch, their slots -1
        md.block_tables = torch.cat([md.block_tables, torch.zeros_like(md.block_tables[:2])])
        md.seq_lens = torch.cat([md.seq_lens, torch.zeros(2, dtype=torch.int32, device=DEVICE)])
    unfused = _store_then_attend(md, kv_cache, query, key, value, sliding_window, num_splits)
    fused = _stored_by_attention(md, kv_cache, query, key, value, sliding_window, num_splits)
    for a, b in zip(fused, unfused):
        assert torch.equal(a.nan_to_num(123.0), b.nan_to_num(123.0))


@pytest.mark.parametrize("kernels", ["", "store_kv_and_attend=torch"])
def test_store_kv_and_attend_picks_the_fused_decode_and_falls_back_for_prefill(kernels, monkeypatch):
    monkeypatch.setenv("GRAPHMODE_OP_KERNELS", kernels)  # "=torch": kept apart, for comparisons
    separate_stores = []
    store_kv = triton_kernels.store_kv
    for query_lens, seq_lens in (([1, 1, 1], [9, 40, 77]), ([1, 37, 5], [40, 37, 90])):
        md, kv_cache, query, key, value = _build_batch(query_lens, seq_lens, 8, 2, 64, DTYPES[-1], seed=9)
        expected_cache, expected = kv_cache.clone(), torch.full_like(query, float("nan"))
        store_kv(key, value, expected_cache, md.slot_mapping)
        triton_kernels.paged_attention(query, expected_cache, md, 0.125, None, expected)
        out = torch.full_like(query, float("nan"))
        with monkeypatch.context() as m:
            m.setattr(triton_kernels, "store_kv", lambda *a: separate_stores.append(len(query_lens)) or store_kv(*a))
            triton_kernels.store_kv_and_attend(query, key, value, kv_cache, md, 0.125, None, out)
        assert torch.equal(out, expected) and torch.equal(kv_cache.nan_to_num(1.0), expected_cache.nan_to_num(1.0))
    # The decode batch stores inside its kernel unless kept apart; the mixed batch always stores first.
    assert len(separate_stores) == (2 if kernels else 1)


@pytest.mark.skipif(INTERPRET, reason="long contexts are too slow in the interpreter")
@pytest.mark.parametrize("sliding_window", [None, 1024])
def test_long_context_decode(sliding_window):
    seq_lens = [4000, 1500]
    batch = _build_batch([1, 1], seq_lens, 32, 8, 128, torch.bfloat16, seed=5)
    _run_and_check(*batch, sliding_window=sliding_window)
    batch = _build_batch([300, 1], seq_lens, 32, 8, 128, torch.bfloat16, seed=6)
    _run_and_check(*batch, sliding_window=sliding_window)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("num_seqs", [1, 4])
def test_decode_cuda_graph_replay(num_seqs):
    # Capture once, then change seq_lens / queries in place: the replay must follow them.
    seq_lens = [300, 17, 1, 150][:num_seqs]
    padded = num_seqs + 2
    md, kv_cache, query, key, value = _build_batch([1] * num_seqs, seq_lens, 32, 8, 64, torch.bfloat16,
                                                   seed=21, num_padded_tokens=padded)
    triton_kernels.store_kv(key, value, kv_cache, md.slot_mapping)
    extra = padded - num_seqs
    md.block_tables = torch.cat([md.block_tables, torch.zeros_like(md.block_tables[:1]).expand(extra, -1)])
    md.seq_lens = torch.cat([md.seq_lens, torch.zeros(extra, dtype=torch.int32, device=DEVICE)])
    md.query_start_loc = torch.cat([md.query_start_loc, md.query_start_loc[-1:].expand(extra)])
    real_seq_lens = md.seq_lens.clone()
    scale = 64 ** -0.5
    out = torch.empty_like(query)

    def step():
        triton_kernels.paged_attention(query, kv_cache, md, scale, None, out)

    md.seq_lens.fill_(1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for new_lens in (real_seq_lens, (real_seq_lens + 1) // 2):
        md.seq_lens.copy_(new_lens)
        query.copy_(torch.randn_like(query))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(query, kv_cache, md, scale, None)
        tol = _tol(torch.bfloat16) * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(out[:num_seqs].float(), ref[:num_seqs], atol=tol, rtol=_tol(torch.bfloat16))
        assert torch.all(out[num_seqs:] == 0)
