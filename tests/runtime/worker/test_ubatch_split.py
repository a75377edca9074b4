"""DBO split decision, per-micro-batch metadata and the join, on edge cases."""
import pytest
import torch

from compiler.config import CompilationConfig
from compiler.dispatcher import GraphDispatcher
from runtime.forward_context import BatchDescriptor
from runtime.attention import torch_backend
from runtime.attention.metadata import AttentionMetadata
from runtime.contracts.config import EngineConfig
from runtime.worker.ubatch_split import DBOThresholds, UBatchSlice, cuts_a_request, plan_ubatches, slice_lens

T = DBOThresholds(decode_tokens=4, prefill_tokens=16)


def _parts(query_lens):
    split = plan_ubatches(query_lens, T)
    return None if split is None else [(list(p.rows), list(p.tokens)) for p in split]


def test_one_decode_request_never_splits():
    assert plan_ubatches([1], T) is None
    assert plan_ubatches([], T) is None


def test_all_decode_splits_by_requests_at_the_threshold_exactly():
    assert plan_ubatches([1, 1, 1], T) is None  # 3 < 4
    assert _parts([1, 1, 1, 1]) == [([0, 1], [0, 1]), ([2, 3], [2, 3])]  # 4 == threshold: split
    # Odd counts put the extra token in the first micro-batch; no request is shared.
    assert _parts([1] * 5) == [([0, 1, 2], [0, 1, 2]), ([3, 4], [3, 4])]


def test_prefill_uses_its_own_threshold():
    assert plan_ubatches([1, 1, 13], T) is None  # 15 tokens with a prefill: below 16
    assert plan_ubatches([1, 1, 1, 1, 2], T) is None  # decode threshold met, but a 2-token query is a prefill
    assert _parts([1, 1, 14]) == [([0, 1, 2], list(range(8))), ([2], list(range(8, 16)))]


def test_one_long_prefill_is_cut_in_the_middle():
    split = plan_ubatches([100], T)
    assert split == [UBatchSlice(range(0, 1), range(0, 50)), UBatchSlice(range(0, 1), range(50, 100))]
    # With 20 tokens already cached, the first part's KV ends at its last query token.
    assert slice_lens([100], [120], split[0]) == ([50], [70])
    assert slice_lens([100], [120], split[1]) == ([50], [120])
    assert cuts_a_request(split)  # micro-batch 1 reads the KV micro-batch 0 writes: run in order
    assert cuts_a_request(plan_ubatches([1, 1, 14], T))


def test_cut_on_a_request_boundary_shares_no_request():
    split = plan_ubatches([8, 8], T)
    assert [list(p.rows) for p in split] == [[0], [1]]
    assert slice_lens([8, 8], [8, 30], split[1]) == ([8], [30])
    assert not cuts_a_request(split)  # independent requests: the micro-batches may run concurrently
    assert not cuts_a_request(plan_ubatches([1] * 5, T))


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match="decode_tokens"):
        DBOThresholds(1, 16)
    with pytest.raises(ValueError, match="dbo_prefill_token_threshold"):
        EngineConfig(enable_dbo=True, dbo_prefill_token_threshold=0)
    assert EngineConfig().dbo_thresholds() is None
    assert EngineConfig(enable_dbo=True, dbo_decode_token_threshold=8).dbo_thresholds() is None  # one device: off
    forced = EngineConfig(enable_dbo=True, force_dbo=True, dbo_decode_token_threshold=8)
    sharded = EngineConfig(enable_dbo=True, tensor_parallel_size=2, dbo_decode_token_threshold=8)
    assert forced.dbo_thresholds() == sharded.dbo_thresholds() == DBOThresholds(8, 512)


def _random_step(query_lens, seq_lens, block_size, heads=4, kv_heads=2, dim=8):
    g = torch.Generator().manual_seed(0)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    ids = torch.randperm(sum(blocks_per_seq) + 4, generator=g).tolist()
    tables, at = [], 0
    for n in blocks_per_seq:
        tables.append(ids[at:at + n])
        at += n
    cache = torch.randn(2, len(ids), block_size, kv_heads, dim, generator=g)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, dim, generator=g)
    k = torch.randn(tokens, kv_heads, dim, generator=g)
    v = torch.randn(tokens, kv_heads, dim, generator=g)
    return tables, cache, q, k, v


def _attend(md, cache, q, k, v):
    out = torch.empty_like(q)
    torch_backend.store_kv(k, v, cache, md.slot_mapping)
    torch_backend.paged_attention(q, cache, md, 0.3, None, out)
    return out


@pytest.mark.parametrize("query_lens,seq_lens", [
    ([1, 10, 1, 6], [7, 13, 5, 6]),  # mixed, the cut lands inside the 10-token prefill (3 tokens cached)
    ([40], [57]),  # one long prefill over a cached prefix
    ([1] * 8, [3, 9, 4, 17, 1, 2, 30, 5]),  # all decode
])
def test_split_metadata_attends_like_the_whole_step(query_lens, seq_lens):
    bs = 4
    tables, cache, q, k, v = _random_step(query_lens, seq_lens, bs)
    whole_md = AttentionMetadata.build(query_lens, seq_lens, tables, bs)
    whole = _attend(whole_md, cache.clone(), q, k, v)
    split = plan_ubatches(query_lens, DBOThresholds(2, 2))
    split_cache, outs = cache.clone(), []
    for part in split:  # micro-batch 0 first: the second may read KV the first wrote (a cut prefill)
        q_lens, s_lens = slice_lens(query_lens, seq_lens, part)
        md = AttentionMetadata.build(q_lens, s_lens, [tables[r] for r in part.rows], bs)
        t = slice(part.tokens.start, part.tokens.stop)
        assert torch.equal(md.slot_mapping, whole_md.slot_mapping[t])  # consistent with the flat split
        outs.append(_attend(md, split_cache, q[t], k[t], v[t]))
    joined = torch.cat(outs)  # the join: concatenated micro-batch rows are the whole step's rows
    torch.testing.assert_close(joined, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_cache, _store_only(whole_md, cache.clone(), k, v))


def _store_only(md, cache, k, v):
    torch_backend.store_kv(k, v, cache, md.slot_mapping)
    return cache


def test_dispatcher_pads_micro_batches_to_their_own_sizes():
    cfg = CompilationConfig(mode="compile", graph_mode="full_and_piecewise",
                            capture_sizes=[1, 2, 4, 8, 16, 32, 48])
    d = GraphDispatcher(cfg, max_tokens=48, max_seqs=48, platform_has_graphs=True)
    # a micro-batch holds at most 24 tokens: padded to 32
    assert d.sizes("piecewise", ubatch=0) == d.sizes("full", ubatch=1) == [1, 2, 4, 8, 16, 32]
    whole, micro = d.dispatch(BatchDescriptor(40, True)), d.dispatch(BatchDescriptor(20, True, ubatch=1))
    assert (whole.mode, whole.padded_tokens, whole.ubatch) == ("full", 48, None)
    assert (micro.mode, micro.padded_tokens, micro.ubatch) == ("full", 32, 1)
    assert d.dispatch(BatchDescriptor(20, False, ubatch=0)).mode == "piecewise"
    assert d.dispatch(BatchDescriptor(33, False, ubatch=0)).mode == "none"  # beyond the micro-batch sizes


def test_dispatcher_full_and_piecewise_ladders_are_separate():
    """Default ladders: full graphs for uniform decode up to max_num_seqs, a coarser piecewise ladder up to
    the token budget (capped at 512); a decode step past the full ladder runs piecewise."""
    cfg = CompilationConfig(mode="compile", graph_mode="full_and_piecewise")
    d = GraphDispatcher(cfg, max_tokens=2048, max_seqs=64, platform_has_graphs=True)
    assert d.sizes("full") == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert d.sizes("piecewise") == [1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    assert d.dispatch(BatchDescriptor(20, True)).padded_tokens == 24  # decode: the fine ladder
    assert d.dispatch(BatchDescriptor(20, False)).padded_tokens == 32  # mixed: the coarse one
    beyond = d.dispatch(BatchDescriptor(100, True))  # more sequences than max_num_seqs' full graphs
    assert (beyond.mode, beyond.padded_tokens) == ("piecewise", 128)
    assert d.dispatch(BatchDescriptor(600, False)).mode == "none"
    d.disable_full("test")
    assert d.dispatch(BatchDescriptor(20, True)).mode == "piecewise" and d.sizes("full", ubatch=0) == []


def test_explicit_capture_sizes_serve_both_modes_unless_full_sizes_are_given():
    cfg = CompilationConfig(mode="compile", graph_mode="full_and_piecewise", capture_sizes=[1, 8, 64])
    assert cfg.full_sizes(max_seqs=16, max_tokens=256) == [1, 8] and cfg.piecewise_sizes(256) == [1, 8, 64]
    cfg = CompilationConfig(mode="compile", graph_mode="full", capture_sizes=[1, 8, 64], full_capture_sizes=[2, 4])
    d = GraphDispatcher(cfg, max_tokens=256, max_seqs=16, platform_has_graphs=True)
    assert d.sizes("full") == [2, 4] and d.sizes("piecewise") == []  # graph_mode full: no piecewise graphs
