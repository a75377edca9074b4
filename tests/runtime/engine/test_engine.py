"""The engine end to end on SmolLM2 (CPU, fp32): batching must not change any request's tokens."""
import random

import pytest

from runtime import LLM
from runtime.contracts.sampling_params import SamplingParams

NUM_REQUESTS = 64
MAX_MODEL_LEN = 1024


def _workload(tokenizer):
    """64 prompts of 1..700 tokens (a few long, many short, some sharing prefixes) and mixed output lengths."""
    rng = random.Random(0)
    vocab = tokenizer.vocab_size
    shared = [rng.randrange(100, vocab) for _ in range(200)]
    prompts, params = [], []
    for i in range(NUM_REQUESTS):
        if i % 8 == 0:
            length = rng.randint(300, 700)
        else:
            length = rng.choice([1, 2, 5, 17, 33, 48, 64])
        prompt = [rng.randrange(100, vocab) for _ in range(length)]
        if i % 5 == 0:
            prompt = shared[: rng.choice([32, 64, 200])] + prompt[:40]
        prompts.append(prompt)
        params.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 8), ignore_eos=True))
    return prompts, params


@pytest.fixture(scope="module")
def workload(smollm2_tokenizer):
    return _workload(smollm2_tokenizer)


@pytest.fixture(scope="module")
def alone_tokens(smollm2, workload):
    """Each request run on its own (prefix cache off, so nothing is shared between them)."""
    llm = LLM.from_loaded(smollm2, max_num_seqs=1, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64,
                          enable_prefix_caching=False)
    prompts, params = workload
    return [llm.generate([p], [sp], use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]


@pytest.mark.parametrize("engine_args", [
    dict(max_num_seqs=64, num_kv_blocks=1200),  # everything fits: one big continuous batch
    # too small for the batch: forces preemption (50 blocks hold one 800-token sequence, not 1024)
    dict(max_num_seqs=64, num_kv_blocks=50, max_model_len=800),
    dict(max_num_seqs=16, max_num_batched_tokens=64, num_kv_blocks=400),  # chunked prefill, tight budget
], ids=["batched", "preemption", "chunked"])
def test_batched_greedy_equals_alone(smollm2, workload, alone_tokens, engine_args):
    llm = LLM.from_loaded(smollm2, **{"max_model_len": MAX_MODEL_LEN, **engine_args})
    prompts, params = workload
    outs = llm.generate(prompts, params, use_tqdm=False)
    mismatched = [i for i, (o, ref) in enumerate(zip(outs, alone_tokens)) if o.outputs[0].token_ids != ref]
    assert not mismatched, f"requests {mismatched} differ from their solo run"
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    cache = llm.engine.kv_cache
    assert cache.num_used_blocks == 0, "every block must be free after the run"
    if engine_args["num_kv_blocks"] == 50:
        assert sum(o.metrics.num_preemptions for o in outs) > 0, "the small cache should have forced preemption"
    if engine_args.get("max_num_batched_tokens") == 64:
        assert llm.engine.num_steps >= max(len(p) for p in prompts) // 64  # the longest prompt was split
    if engine_args["num_kv_blocks"] == 1200:
        assert cache.prefix_cache_hits > 0, "shared prefixes should hit the prefix cache"


def test_seeded_sampling_is_reproducible_and_batch_independent(smollm2, smollm2_tokenizer):
    llm = LLM.from_loaded(smollm2, max_num_seqs=8, max_model_len=256, num_kv_blocks=128)
    prompt = smollm2_tokenizer.encode("Write a short poem about the sea.")
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], [seeded], use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([prompt], [seeded], use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=99, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=9)]
    mixed = llm.generate([prompt[:3], prompt, prompt[2:], prompt], others[:2] + [seeded] + others[2:],
                         use_tqdm=False)
    assert alone == again
    assert mixed[2].outputs[0].token_ids != alone or prompt[2:] == prompt  # different prompt, sanity
    in_batch = llm.generate([prompt[:5], prompt, prompt[1:]], [others[0], seeded, others[1]], use_tqdm=False)
    assert in_batch[1].outputs[0].token_ids == alone
    assert llm.engine.kv_cache.num_used_blocks == 0


def test_temperature_zero_is_greedy(smollm2, smollm2_tokenizer):
    llm = LLM.from_loaded(smollm2, max_num_seqs=4, max_model_len=256, num_kv_blocks=64)
    prompt = smollm2_tokenizer.encode("The capital of France is")
    greedy = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    top_k1 = llm.generate([prompt], SamplingParams(temperature=0.8, top_k=1, max_tokens=8, seed=3, ignore_eos=True),
                          use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == top_k1[0].outputs[0].token_ids


def test_chat_stop_strings_n_and_logprobs(smollm2):
    llm = LLM.from_loaded(smollm2, max_num_seqs=4, max_model_len=512, num_kv_blocks=128)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text and out.outputs[0].finish_reason == "stop"
    stopped = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0.0, max_tokens=30, stop=["Paris"]), use_tqdm=False)[0]
    assert stopped.outputs[0].text == out.outputs[0].text.split("Paris")[0]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == "Paris"
    many = llm.generate(["Once upon a time"], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6,
                                                              logprobs=2, ignore_eos=True), use_tqdm=False)[0]
    assert len(many.outputs) == 3 and all(len(c.token_ids) == 6 for c in many.outputs)
    assert all(len(c.logprobs) == 6 and len(c.logprobs[0][1]) == 2 for c in many.outputs)
    assert llm.engine.kv_cache.num_used_blocks == 0


def test_bad_requests_raise_clear_errors(smollm2):
    llm = LLM.from_loaded(smollm2, max_num_seqs=2, max_model_len=64, num_kv_blocks=16)
    with pytest.raises(ValueError, match="at most 63"):
        llm.generate([[5] * 64], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(TypeError, match="unknown engine argument"):
        LLM.from_loaded(smollm2, max_num_seq=2)


def test_kv_planning_on_a_full_device_names_what_holds_the_memory(monkeypatch):
    """Memory other processes hold counts against gpu_memory_utilization: the error says how much
    is in use and how to size the cache instead."""
    from types import SimpleNamespace

    import runtime.worker.kv_sizing as kv_sizing
    from runtime.contracts.config import EngineConfig
    from runtime.platforms.base import MemoryInfo

    GiB = 1 << 30
    device = SimpleNamespace(supports_memory_profiling=True, memory_reserved=lambda: 3 * GiB,
                             memory_info=lambda: MemoryInfo(free_bytes=10 * GiB, total_bytes=140 * GiB))
    monkeypatch.setattr(kv_sizing, "current_platform", device)
    monkeypatch.setattr(kv_sizing, "profile_peak_bytes", lambda runner: GiB // 4)
    monkeypatch.setattr(kv_sizing, "estimate_full_graph_bytes", lambda runner: 0)
    runner = SimpleNamespace(bytes_per_block=lambda: 1 << 20, graphs=SimpleNamespace(pool_bytes=lambda: 0))
    config = EngineConfig(model="unused")
    with pytest.raises(RuntimeError, match=r"130\.0 GiB already in use on the device \(3\.0 GiB held by this "
                                           r"process's allocator.*127\.0 GiB outside it.*kv_cache_memory_gb"):
        kv_sizing.plan_kv_blocks(config, runner)
    # The same device with room: 85 % of 140 GiB minus 30 GiB in use minus the 0.25 GiB peak.
    device.memory_info = lambda: MemoryInfo(free_bytes=110 * GiB, total_bytes=140 * GiB)
    assert kv_sizing.plan_kv_blocks(config, runner) == int(0.85 * 140 * 1024 - 30 * 1024 - 256)
    # With graphs: the piecewise ones, captured already, are in the memory in use; the full graphs' estimate
    # is kept free, and the pool the KV cache was sized for is recorded for the capture report.
    monkeypatch.setattr(kv_sizing, "estimate_full_graph_bytes", lambda runner: GiB // 2)
    runner.graphs.pool_bytes = lambda: GiB // 8
    assert kv_sizing.plan_kv_blocks(config, runner) == int(0.85 * 140 * 1024 - 30 * 1024 - 256 - 512)
    assert runner.graphs.estimated_pool_bytes == GiB // 8 + GiB // 2


def test_output_snapshot_copies_every_field():
    """RequestOutput snapshots are built field by field (for speed): a field added later must be copied too."""
    import dataclasses

    from runtime.engine.core import _Parent, _Sequence
    from runtime.engine.outputs import CompletionOutput, RequestMetrics

    output = CompletionOutput(2, "text", [1, 2], "stop", [(-0.5, [(1, -0.5)])], "stop-string")
    metrics = RequestMetrics(1.0, 2.0, 3.0, 4, 5)
    parent = _Parent("id", "prompt", [7], [_Sequence(None, None, output)], metrics, finished=True)
    snapshot = parent.to_output()
    assert dataclasses.asdict(snapshot.outputs[0]) == dataclasses.asdict(output)
    assert dataclasses.asdict(snapshot.metrics) == dataclasses.asdict(metrics)
    assert snapshot.outputs[0].token_ids is not output.token_ids


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_min_tokens_holds_stop_tokens_back(smollm2, async_scheduling):
    llm = LLM.from_loaded(smollm2, max_num_seqs=4, max_model_len=256, async_scheduling=async_scheduling)
    prompt = [1, 504, 3458, 282]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0].outputs[0]
    stop = free.token_ids[0]
    held = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, stop_token_ids=[stop])
    out = llm.generate([prompt, prompt], held, use_tqdm=False)
    for o in out:
        assert stop not in o.outputs[0].token_ids[:3] and len(o.outputs[0].token_ids) >= 3
