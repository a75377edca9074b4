"""Scheduler: token budget, chunked prefill, preemption, aborts, prefix hits and stops.

Steps are simulated with schedule() + update_from_output(); the fake "model" samples
``TOKEN_BASE + number of outputs so far``, so a request's outputs do not depend on how
it was batched or preempted.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from runtime.engine.kv_cache import KVCacheManager
from runtime.contracts.request import Request, RequestStatus
from runtime.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

BS = 4
EOS = 2
TOKEN_BASE = 1000


@dataclass
class FakeSamplingParams:
    max_tokens: int = 4
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0


def make_scheduler(num_blocks: int = 64, prefix_caching: bool = True, **config) -> Scheduler:
    kv = KVCacheManager(num_blocks=num_blocks, block_size=BS, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(**config), kv)


def make_request(rid: str, prompt: int | list[int], arrival: float = 0.0, **params) -> Request:
    if isinstance(prompt, int):
        # Distinct per id, so requests share a prefix only when a test says so.
        start = 10_000 + zlib.crc32(rid.encode()) % 1_000_000
        tokens = list(range(start, start + prompt))
    else:
        tokens = list(prompt)
    return Request(
        request_id=rid,
        prompt_token_ids=tokens,
        sampling_params=FakeSamplingParams(**params),
        eos_token_id=EOS,
        arrival_time=arrival,
    )


def fake_sample(out: SchedulerOutput) -> dict[str, int]:
    return {s.request.request_id: TOKEN_BASE + s.request.num_output_tokens for s in out.scheduled if s.samples}


def step(sched: Scheduler) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    return out, sched.update_from_output(out, fake_sample(out))


def steps_until_done(sched: Scheduler, max_steps: int = 500) -> Iterator[tuple[SchedulerOutput, list[Request]]]:
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return
        yield step(sched)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def run_to_completion(sched: Scheduler) -> list[SchedulerOutput]:
    outputs = [out for out, _ in steps_until_done(sched)]
    assert sched.kv_cache.num_used_blocks == 0
    return outputs


def expected_outputs(n: int) -> list[int]:
    return [TOKEN_BASE + i for i in range(n)]


def test_token_budget_is_respected_and_filled() -> None:
    sched = make_scheduler(max_num_batched_tokens=32)
    reqs = [make_request(f"r{i}", 30, arrival=i) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    outputs = run_to_completion(sched)
    assert all(o.num_batched_tokens <= 32 for o in outputs)
    assert outputs[0].num_batched_tokens == 32
    assert [(s.request.request_id, s.num_new_tokens) for s in outputs[0].scheduled] == [("r0", 30), ("r1", 2)]
    assert all(r.output_token_ids == expected_outputs(4) for r in reqs)
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)


def test_chunked_prefill_runs_alongside_decodes() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    a = make_request("a", 4, arrival=0, max_tokens=20)
    sched.add_request(a)
    step(sched)
    b = make_request("b", 40, arrival=1, max_tokens=2)
    sched.add_request(b)
    b_chunks = []
    for _ in range(10):
        if b.num_output_tokens:
            break
        before = a.num_output_tokens
        out, _ = step(sched)
        by_id = {s.request.request_id: s for s in out.scheduled}
        assert by_id["a"].num_new_tokens == 1  # the decode runs every step
        assert a.num_output_tokens == before + 1
        b_chunks.append(by_id["b"].num_new_tokens)
        assert by_id["b"].samples == (b.num_computed_tokens == 40)
    assert b_chunks == [15, 15, 10]
    run_to_completion(sched)
    assert a.output_token_ids == expected_outputs(20)
    assert b.output_token_ids == expected_outputs(2)


def test_long_prefill_threshold_caps_chunks() -> None:
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    a = make_request("a", 20, arrival=0)
    b = make_request("b", 20, arrival=1)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched)
    assert [s.num_new_tokens for s in out.scheduled] == [8, 8]
    run_to_completion(sched)


def test_no_chunking_makes_prefill_wait_for_room() -> None:
    sched = make_scheduler(max_num_batched_tokens=10, enable_chunked_prefill=False)
    a = make_request("a", 4, arrival=0, max_tokens=3)
    b = make_request("b", 10, arrival=1, max_tokens=1)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["a"]  # b would need to be split
    out, _ = step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    out, finished = step(sched)
    assert finished == [a]
    out, finished = step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("b", 10)]
    assert finished == [b]
    assert sched.kv_cache.num_used_blocks == 0


def test_no_chunking_rejects_prompt_larger_than_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    big = make_request("big", 9, arrival=0)
    sched.add_request(big)
    out = sched.schedule()
    assert out.is_empty
    assert big.status is RequestStatus.FINISHED_ABORTED
    assert "max_num_batched_tokens" in big.finish_reason_detail


def test_newest_running_request_is_preempted_and_later_completes() -> None:
    # 4 blocks of 4: a (4 tokens) + b (11 tokens) fill the cache after prefill.
    sched = make_scheduler(num_blocks=4)
    a = make_request("a", 4, arrival=0, max_tokens=10)
    b = make_request("b", 11, arrival=1, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert sched.kv_cache.num_free_blocks == 0
    # a's 5th token needs a new block: b, the newest, must give up its blocks.
    out, _ = step(sched)
    assert out.preempted_ids == ["b"]
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_preemptions == 1
    outputs = run_to_completion(sched)
    assert a.output_token_ids == expected_outputs(10)
    assert b.output_token_ids == expected_outputs(6)
    assert a.num_preemptions == 0
    assert all("b" not in {s.request.request_id for s in o.scheduled} for o in outputs if "b" in o.preempted_ids)


def test_request_that_cannot_grow_preempts_itself() -> None:
    sched = make_scheduler(num_blocks=5)
    reqs = [make_request(n, 4, arrival=i, max_tokens=8) for i, n in enumerate("abc")]
    for r in reqs:
        sched.add_request(r)
    step(sched)
    out, _ = step(sched)  # each needs a 2nd block; only 2 are free
    assert out.preempted_ids == ["c"]
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert sched.num_waiting == 1 and sched.get_request("c").status is RequestStatus.WAITING
    outputs = run_to_completion(sched)
    for o in outputs:
        scheduled = [s.request for s in o.scheduled]
        for pid in o.preempted_ids:
            victim = next(r for r in reqs if r.request_id == pid)
            assert victim not in scheduled
            assert all(r.arrival_time < victim.arrival_time for r in scheduled)
    assert all(r.output_token_ids == expected_outputs(8) for r in reqs)
    assert sum(r.num_preemptions for r in reqs) >= 1


def test_victim_is_latest_arrival_not_latest_admission() -> None:
    sched = make_scheduler(num_blocks=3)
    new = make_request("new", 4, arrival=5.0, max_tokens=6)
    old = make_request("old", 8, arrival=1.0, max_tokens=4)
    sched.add_request(new)  # admitted first, but arrived last
    sched.add_request(old)
    step(sched)
    out, _ = step(sched)  # old's 9th token needs a 3rd block; none are free
    assert out.preempted_ids == ["new"]
    assert [s.request.request_id for s in out.scheduled] == ["old"]
    run_to_completion(sched)
    assert new.output_token_ids == expected_outputs(6)
    assert old.output_token_ids == expected_outputs(4)


def test_preempted_request_goes_to_the_front_of_the_queue() -> None:
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=64)
    a = make_request("a", 4, arrival=0, max_tokens=10)
    b = make_request("b", 11, arrival=1, max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    late = make_request("late", 4, arrival=2, max_tokens=1)
    sched.add_request(late)
    out, _ = step(sched)
    assert out.preempted_ids == ["b"]
    assert "late" not in {s.request.request_id for s in out.scheduled}  # no admissions after a preemption
    admitted = []
    for out, _ in steps_until_done(sched):
        admitted += [s.request.request_id for s in out.scheduled if s.request.request_id != "a"]
    assert admitted.index("b") < admitted.index("late")
    assert sched.kv_cache.num_used_blocks == 0


def test_abort_waiting_and_running_frees_blocks() -> None:
    sched = make_scheduler(max_num_seqs=1)
    running = make_request("run", 10, arrival=0, max_tokens=50)
    waiting = make_request("wait", 10, arrival=1)
    sched.add_request(running)
    sched.add_request(waiting)
    step(sched)
    assert sched.kv_cache.num_used_blocks == 3
    assert sched.abort_request("wait")
    assert waiting.status is RequestStatus.FINISHED_ABORTED and sched.num_waiting == 0
    assert sched.abort_request("run")
    assert running.status is RequestStatus.FINISHED_ABORTED and running.block_ids == []
    assert sched.kv_cache.num_used_blocks == 0
    assert not sched.abort_request("run")
    assert not sched.abort_request("nope")
    out = sched.schedule()
    assert out.is_empty and sorted(out.finished_ids) == ["run", "wait"]
    assert not sched.has_unfinished_requests()


def test_abort_between_schedule_and_update_is_ignored() -> None:
    sched = make_scheduler()
    a = make_request("a", 6, arrival=0)
    sched.add_request(a)
    out = sched.schedule()
    sched.abort_request("a")
    assert sched.update_from_output(out, fake_sample(out)) == []
    assert a.output_token_ids == [] and a.status is RequestStatus.FINISHED_ABORTED
    assert sched.kv_cache.num_used_blocks == 0


def test_finish_request_for_stop_string_frees_at_once() -> None:
    sched = make_scheduler()
    a = make_request("a", 6, arrival=0, max_tokens=50)
    sched.add_request(a)
    step(sched)
    assert sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert a.status is RequestStatus.FINISHED_STOPPED
    assert sched.kv_cache.num_used_blocks == 0
    assert sched.schedule().finished_ids == ["a"]


def test_prefix_cache_hit_on_admission() -> None:
    sched = make_scheduler(max_num_batched_tokens=64)
    kv = sched.kv_cache
    shared = list(range(100, 116))
    a = make_request("a", shared + [1, 2, 3], arrival=0, max_tokens=8)
    sched.add_request(a)
    step(sched)
    b = make_request("b", shared + [7, 8], arrival=1, max_tokens=2)
    same = make_request("same", shared, arrival=2, max_tokens=2)
    sched.add_request(b)
    sched.add_request(same)
    out, _ = step(sched)
    new_tokens = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
    assert b.num_cached_tokens == 16 and new_tokens["b"] == 2
    assert same.num_cached_tokens == 12 and new_tokens["same"] == 4  # never the whole prompt
    assert b.block_ids[:4] == a.block_ids[:4]
    assert [kv.ref_count(x) for x in a.block_ids[:3]] == [3, 3, 3]
    assert kv.ref_count(a.block_ids[3]) == 2
    assert kv.prefix_cache_hits == 16 + 12
    assert kv.prefix_cache_queries == 19 + 18 + 16
    run_to_completion(sched)
    assert b.output_token_ids == expected_outputs(2)


def test_no_prefix_hits_when_disabled() -> None:
    sched = make_scheduler(prefix_caching=False)
    for i in range(2):
        sched.add_request(make_request(f"r{i}", 16, arrival=i))
        step(sched)
    assert sched.get_request("r1").num_cached_tokens == 0
    run_to_completion(sched)
    assert sched.kv_cache.prefix_cache_hits == 0


def test_overlong_and_oversized_prompts_are_aborted_with_reason() -> None:
    sched = make_scheduler(num_blocks=4, max_model_len=20)
    too_long = make_request("long", 21, arrival=0)
    too_big = make_request("big", 17, arrival=1)  # 5 blocks > 4 in the cache
    ok = make_request("ok", 8, arrival=2)
    for r in (too_long, too_big, ok):
        sched.add_request(r)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["ok"]
    assert out.finished_ids == ["long", "big"]
    assert too_long.status is RequestStatus.FINISHED_ABORTED
    assert "max_model_len" in too_long.finish_reason_detail
    assert "KV blocks" in too_big.finish_reason_detail
    assert sched.get_request("long") is None
    sched.update_from_output(out, fake_sample(out))
    run_to_completion(sched)


def test_request_outgrowing_the_whole_cache_is_aborted_not_retried_forever() -> None:
    sched = make_scheduler(num_blocks=2)
    a = make_request("a", 4, arrival=0, max_tokens=10)
    sched.add_request(a)
    for _ in steps_until_done(sched):
        pass
    # Its 9th token needed a 3rd block: it preempted itself, then could never come back.
    assert a.num_preemptions == 1
    assert a.output_token_ids == expected_outputs(5)
    assert a.status is RequestStatus.FINISHED_ABORTED
    assert "KV blocks" in a.finish_reason_detail
    assert sched.kv_cache.num_used_blocks == 0


def test_max_num_seqs_is_respected() -> None:
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(f"r{i}", 5, arrival=i, max_tokens=3) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    max_seen = 0
    for out, _ in steps_until_done(sched):
        assert sched.num_running <= 2
        max_seen = max(max_seen, len(out.scheduled))
    assert max_seen == 2
    assert sched.kv_cache.num_used_blocks == 0
    assert all(r.output_token_ids == expected_outputs(3) for r in reqs)


def test_stop_conditions() -> None:
    sched = make_scheduler(max_model_len=12)
    eos_first = TOKEN_BASE  # the fake model's first sample
    stop = make_request("stop", 4, arrival=0, max_tokens=9, stop_token_ids=[TOKEN_BASE + 2])
    eos = make_request("eos", 4, arrival=1, max_tokens=9)
    eos.eos_token_id = eos_first
    ignored = make_request("ignored", 4, arrival=2, max_tokens=3)
    ignored.eos_token_id = eos_first
    ignored.sampling_params.ignore_eos = True
    min_tok = make_request("min", 4, arrival=3, max_tokens=6, min_tokens=2, stop_token_ids=[TOKEN_BASE])
    model_len = make_request("len", 10, arrival=4, max_tokens=50)
    for r in (stop, eos, ignored, min_tok, model_len):
        sched.add_request(r)
    run_to_completion(sched)
    assert (stop.status, stop.num_output_tokens) == (RequestStatus.FINISHED_STOPPED, 3)
    assert (eos.status, eos.num_output_tokens) == (RequestStatus.FINISHED_STOPPED, 1)
    assert (ignored.status, ignored.num_output_tokens) == (RequestStatus.FINISHED_LENGTH, 3)
    # The stop token came before min_tokens, so it did not stop the request.
    assert (min_tok.status, min_tok.num_output_tokens) == (RequestStatus.FINISHED_LENGTH, 6)
    assert (model_len.status, model_len.num_tokens) == (RequestStatus.FINISHED_LENGTH, 12)


def test_duplicate_request_id_is_rejected() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 4))
    with pytest.raises(ValueError):
        sched.add_request(make_request("a", 4))


def test_older_long_prefill_does_not_starve_newer_decodes() -> None:
    """A preempted, older request re-prefilling a long prompt leaves budget for every decode."""
    sched = make_scheduler(num_blocks=200, max_num_batched_tokens=16)
    for i in range(4):
        sched.add_request(make_request(f"d{i}", 3, arrival=1.0 + i, max_tokens=50))
    step(sched)  # all four prefilled (12 tokens)
    sched.add_request(make_request("old", 100, arrival=0.0, max_tokens=2))
    for _ in range(10):
        out, _ = step(sched)
        ids = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
        assert all(ids.get(f"d{i}") == 1 for i in range(4)), f"a decode was starved: {ids}"
        assert out.num_batched_tokens <= 16
    # Arriving first, "old" ran first in the running order and still finished on the leftover budget.
    assert sched.get_request("old") is None
    assert sched.kv_cache.num_used_blocks > 0  # only the decodes' blocks remain


@pytest.mark.parametrize("remaining", [[], [1], [5], [1, 5, 1, 1, 3, 1], [7, 7, 1], [1] * 9])
def test_decodes_after_counts_the_decoding_requests_behind_each(remaining):
    from runtime.engine.scheduler import _decodes_after

    assert _decodes_after(remaining) == [sum(1 for r in remaining[j + 1:] if r == 1) for j in range(len(remaining))]
