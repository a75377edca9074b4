"""Async scheduling (a step launched before the previous one's tokens are on the host) gives exactly the
tokens of synchronous scheduling: greedy and seeded, with stop strings, max_tokens, aborts mid-way and
preemption. On CPU the launch is synchronous, but every piece of the async path runs: the scheduler's
pending tokens, inputs read from the previous step's sampled tensor, results taken in one step late."""
from __future__ import annotations

import random

import pytest

from runtime import LLM, SamplingParams

NUM_REQUESTS = 64
ABORTED = {"r5", "r17", "r33", "r50"}


def _workload(vocab: int) -> list[tuple[str, list[int], SamplingParams]]:
    """Greedy and seeded requests mixed: prompts of 3..300 tokens, 1..64 outputs, stop strings, EOS."""
    rng = random.Random(0)
    work = []
    for i in range(NUM_REQUESTS):
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(3, 300))]
        kwargs = {"max_tokens": rng.randint(1, 64), "ignore_eos": i % 3 == 0,
                  "stop": [rng.choice([".", " the", "\n"])] if i % 4 == 1 else None}
        if i % 2:
            kwargs.update(temperature=0.8, top_p=0.95, seed=1000 + i)
        else:
            kwargs.update(temperature=0.0)
        if i % 16 == 7:
            kwargs["repetition_penalty"] = 1.2  # the engine takes the in-flight step in before such a step
        if i % 8 == 3:
            kwargs["logprobs"] = 2
        work.append((f"r{i}", prompt, SamplingParams(**kwargs)))
    return work


def _run(llm: LLM, work, abort_at_step: int = 6) -> tuple[dict[str, tuple], int]:
    """Each request's (tokens, finish reason, log-probs) and the preemptions there were."""
    core = llm.engine
    for rid, prompt, params in work:
        core.add_request(rid, prompt, params)
    outputs, steps = {}, 0
    while core.has_unfinished_requests():
        for out in core.step():
            outputs[out.request_id] = out
        steps += 1
        if steps == abort_at_step:
            for rid in ABORTED:
                core.abort_request(rid)
    assert core.kv_cache.num_used_blocks == 0 and not core.scheduler.has_unfinished_requests()
    preemptions = sum(o.metrics.num_preemptions for o in outputs.values())
    return {rid: (o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].logprobs)
            for rid, o in outputs.items()}, preemptions


@pytest.fixture(scope="module")
def engines(smollm2):
    # 100 blocks of 16 hold 1,600 tokens: 8 running requests of up to 364 tokens preempt one another now and then.
    common = dict(max_num_seqs=8, max_num_batched_tokens=512, num_kv_blocks=100, max_model_len=400)
    return {mode: LLM.from_loaded(smollm2, async_scheduling=mode == "async", **common)
            for mode in ("sync", "async")}


@pytest.mark.slow
def test_async_scheduling_gives_the_tokens_of_sync(engines):
    assert engines["async"].engine.async_scheduling and not engines["sync"].engine.async_scheduling
    work = _workload(engines["sync"].engine.vocab_size)
    (sync, sync_preempted), (async_, async_preempted) = (_run(engines[m], work) for m in ("sync", "async"))
    assert sync_preempted > 0 and async_preempted > 0, "the cache is sized to force preemption"
    # An aborted request's last output is the abort call's to report, not a step's (the steps may have
    # reported some tokens of it before, sooner without async scheduling).
    assert set(sync) - ABORTED == set(async_) - ABORTED == {rid for rid, _, _ in work} - ABORTED
    for rid, _, params in work:
        if rid in ABORTED:
            continue
        assert async_[rid][:2] == sync[rid][:2], rid
        assert len(async_[rid][0]) <= params.max_tokens
        if params.logprobs is not None:
            assert [lp[0] for lp in async_[rid][2]] == pytest.approx([lp[0] for lp in sync[rid][2]], abs=1e-4)


def test_a_request_stopped_by_eos_in_flight_emits_nothing_after(engines):
    """A request that finishes at step N is already scheduled in N+1 under async scheduling: what N+1
    computed for it is dropped, and its blocks come back."""
    llm = engines["async"]
    core = llm.engine
    prompt = [5, 6, 7, 8]
    ref = engines["sync"].generate([prompt], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    stop_token = ref.outputs[0].token_ids[2]
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_token])
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref.outputs[0].token_ids[:ref.outputs[0].token_ids.index(stop_token) + 1]
    assert out.finish_reason == "stop"
    assert core.kv_cache.num_used_blocks == 0 and not core.has_unfinished_requests()
