"""KVCacheManager: block accounting, prefix-cache hits, ref counts and LRU eviction."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from runtime.engine.kv_cache import KVCacheManager
from runtime.contracts.request import Request

BS = 4


@dataclass
class FakeSamplingParams:
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(tokens), sampling_params=FakeSamplingParams())


def prefill(kv: KVCacheManager, request: Request, use_cache: bool = True) -> int:
    """Admit ``request`` and compute its whole prompt, as the scheduler would; returns cached tokens."""
    blocks, num_cached = kv.get_computed_blocks(request) if use_cache else ([], 0)
    request.num_computed_tokens = num_cached
    assert kv.allocate(request, request.num_tokens - num_cached, blocks)
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request)
    return num_cached


def test_allocate_and_free_exact_accounting() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", list(range(10)))
    assert kv.allocate(req, 10)
    assert len(req.block_ids) == 3
    assert len(set(req.block_ids)) == 3
    assert (kv.num_used_blocks, kv.num_free_blocks) == (3, 5)
    assert kv.usage == pytest.approx(3 / 8)
    assert all(kv.ref_count(b) == 1 for b in req.block_ids)
    kv.free(req)
    assert req.block_ids == []
    assert (kv.num_used_blocks, kv.num_free_blocks) == (0, 8)


def test_allocate_grows_only_when_a_block_fills() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", list(range(4)))
    assert kv.allocate(req, 4)
    req.num_computed_tokens = 4
    first = list(req.block_ids)
    assert kv.allocate(req, 1)  # token 5 needs a second block
    assert req.block_ids[:1] == first and len(req.block_ids) == 2
    req.num_computed_tokens = 5
    assert kv.allocate(req, 3)  # tokens 6..8 still fit in block 2
    assert len(req.block_ids) == 2
    assert kv.num_used_blocks == 2


def test_allocate_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(12)))
    assert kv.allocate(a, 12)
    b = make_request("b", list(range(8)))
    assert not kv.allocate(b, 8)
    assert b.block_ids == []
    assert kv.num_used_blocks == 3
    assert kv.allocate(b, 4)
    assert kv.num_free_blocks == 0


def test_num_blocks_needed_rounds_up() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    assert [kv.num_blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_only_full_computed_blocks_are_hashed_incrementally() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", list(range(10)))
    assert kv.allocate(req, 10)
    req.num_computed_tokens = 3
    kv.cache_full_blocks(req)
    assert kv.num_cached_blocks == 0
    req.num_computed_tokens = 6
    kv.cache_full_blocks(req)
    assert [kv.is_cached(b) for b in req.block_ids] == [True, False, False]
    req.num_computed_tokens = 10
    kv.cache_full_blocks(req)
    assert [kv.is_cached(b) for b in req.block_ids] == [True, True, False]
    # Output tokens that fill a block make it cacheable too.
    req.output_token_ids += [50, 51]
    assert kv.allocate(req, 2)
    req.num_computed_tokens = 12
    kv.cache_full_blocks(req)
    assert [kv.is_cached(b) for b in req.block_ids] == [True, True, True]


def test_prefix_hit_shares_blocks_and_counts_stats() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", list(range(10)))
    assert prefill(kv, a) == 0
    b = make_request("b", list(range(8)) + [99, 98, 97])
    blocks, num_cached = kv.get_computed_blocks(b)
    assert blocks == a.block_ids[:2]
    assert num_cached == 8
    # Lookup alone does not claim anything.
    assert [kv.ref_count(x) for x in blocks] == [1, 1]
    b.num_computed_tokens = num_cached
    assert kv.allocate(b, b.num_tokens - num_cached, blocks)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] not in a.block_ids
    assert [kv.ref_count(x) for x in blocks] == [2, 2]
    assert kv.num_used_blocks == 4  # 3 for a, 1 new for b
    assert kv.prefix_cache_queries == 10 + 11
    assert kv.prefix_cache_hits == 8
    assert kv.hit_rate == pytest.approx(8 / 21)
    kv.free(a)
    kv.free(b)
    assert kv.num_used_blocks == 0


def test_hit_never_covers_the_whole_prompt() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prefill(kv, make_request("a", list(range(12))))
    same = make_request("b", list(range(12)))
    blocks, num_cached = kv.get_computed_blocks(same)
    assert num_cached == 8 and len(blocks) == 2
    shorter = make_request("c", list(range(9)))
    assert kv.get_computed_blocks(shorter)[1] == 8
    tiny = make_request("d", list(range(4)))
    assert kv.get_computed_blocks(tiny) == ([], 0)


def test_hash_chains_through_the_parent_block() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prefill(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first block: the second must not match.
    other = make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(other) == ([], 0)


def test_freed_hashed_blocks_stay_cached_and_are_revived() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(10)))
    prefill(kv, a)
    cached = a.block_ids[:2]
    kv.free(a)
    assert kv.num_used_blocks == 0
    assert kv.num_evictable_blocks == 2
    b = make_request("b", list(range(10)))
    assert prefill(kv, b) == 8
    assert b.block_ids[:2] == cached
    assert [kv.ref_count(x) for x in cached] == [1, 1]
    assert kv.num_evictable_blocks == 0
    assert kv.num_used_blocks == 3
    kv.free(b)
    assert kv.num_used_blocks == 0


def test_allocation_prefers_free_blocks_then_evicts_lru_tail_first() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(13)))  # 3 full hashed blocks + 1 partial
    prefill(kv, a)
    head, mid, tail, partial = a.block_ids
    kv.free(a)
    assert kv.num_evictable_blocks == 3
    b = make_request("b", [100] * 4)
    assert kv.allocate(b, 4)
    assert b.block_ids == [partial]  # truly free block first, cache untouched
    assert kv.num_cached_blocks == 3
    c = make_request("c", [200] * 4)
    assert kv.allocate(c, 4)
    assert c.block_ids == [tail]  # freed in reverse, so the tail goes first
    assert not kv.is_cached(tail)
    probe = make_request("p", list(range(13)))
    assert kv.get_computed_blocks(probe) == ([head, mid], 8)
    d = make_request("d", [300] * 4)
    assert kv.allocate(d, 4)
    assert d.block_ids == [mid]
    assert kv.get_computed_blocks(probe) == ([head], 4)


def test_cache_hit_refreshes_lru_position() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", [1] * 4 + [0])
    b = make_request("b", [2] * 4 + [0])
    prefill(kv, a)
    prefill(kv, b)
    kv.free(a)  # partial block -> free list, full block -> LRU (oldest)
    kv.free(b)
    a2 = make_request("a2", [1] * 4 + [5])
    assert prefill(kv, a2) == 4
    kv.free(a2)  # a's block goes back to the LRU as the most recent
    x = make_request("x", [7] * 12)
    assert kv.allocate(x, 12)  # two free blocks + one eviction
    assert kv.num_used_blocks == 3
    assert kv.get_computed_blocks(make_request("pa", [1] * 4 + [9]))[1] == 4
    assert kv.get_computed_blocks(make_request("pb", [2] * 4 + [9]))[1] == 0


def test_allocate_counts_revived_blocks_against_the_pool() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(9)))
    prefill(kv, a)
    kv.free(a)  # 2 evictable cached + 2 truly free
    queries_before = kv.prefix_cache_queries
    b = make_request("b", list(range(8)) + [50] * 9)  # 17 tokens -> 5 blocks
    blocks, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 8
    b.num_computed_tokens = num_cached
    # 2 revived + 3 new > 4 blocks in the pool: must fail without touching anything.
    assert not kv.allocate(b, 9, blocks)
    assert b.block_ids == []
    assert kv.num_evictable_blocks == 2 and kv.num_used_blocks == 0
    assert kv.prefix_cache_queries == queries_before  # a failed admission is not counted
    assert kv.allocate(b, 4, blocks)  # 2 revived + 1 new
    assert kv.num_used_blocks == 3
    assert kv.prefix_cache_queries == queries_before + 17
    assert kv.prefix_cache_hits == 8


def test_concurrent_duplicate_block_is_not_registered_twice() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(5)))
    b = make_request("b", list(range(5)))
    # Both admitted before either computed anything: no sharing possible.
    assert kv.allocate(a, 5, [])
    assert kv.allocate(b, 5, [])
    for req in (a, b):
        req.num_computed_tokens = 5
        kv.cache_full_blocks(req)
    assert kv.is_cached(a.block_ids[0]) and not kv.is_cached(b.block_ids[0])
    kv.free(b)
    kv.free(a)
    assert kv.num_used_blocks == 0
    assert kv.num_evictable_blocks == 1


def test_prefix_caching_disabled() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prefill(kv, make_request("a", list(range(10))))
    b = make_request("b", list(range(10)))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.num_cached_blocks == 0
    assert prefill(kv, b) == 0
    assert kv.hit_rate == 0.0


def test_release_underflow_is_an_error() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(4)))
    assert kv.allocate(a, 4)
    stale = list(a.block_ids)
    kv.free(a)
    a.block_ids = stale
    with pytest.raises(RuntimeError):
        kv.free(a)
