"""Tensor and expert parallelism on CPU: two gloo worker processes against the single-process engine.

Greedy tokens must be identical to TP=1 (SmolLM2's real weights, whose 9 query / 3 KV heads do
not divide by 2, and the tiny Qwen3-MoE with experts sliced or whole per rank), eager and
compiled piecewise; a killed worker must surface as a clear error within seconds.
"""
import os
import signal
import threading
import time

import pytest
from safetensors.torch import save_file

from models.testing import write_tiny_checkpoint
from runtime import LLM
from runtime.engine.executor import WorkerError
from runtime.contracts.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PIECEWISE = {"mode": "compile", "backend": "eager", "graph_mode": "piecewise"}
# The MoE runs also split the graph at the all-reduce: the collective is an ordinary splittable op.
PIECEWISE_SPLIT_AT_ALL_REDUCE = dict(PIECEWISE, splitting_ops=["graphmode::attention", "graphmode::all_reduce"])
ENGINE = dict(max_num_seqs=8, max_model_len=256, num_kv_blocks=96, max_num_batched_tokens=64, dtype="float32")


def _tokens(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _tp_tokens(path, prompts, params=GREEDY, **kwargs):
    llm = LLM(path, tensor_parallel_size=2, **ENGINE, **kwargs)
    try:
        return _tokens(llm, prompts, params)
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def smollm2_dir(smollm2, tmp_path_factory):
    """SmolLM2's real (dequantised) weights as safetensors: each worker then loads in a fraction of
    a second instead of dequantising the GGUF again."""
    directory = tmp_path_factory.mktemp("smollm2")
    smollm2.config.save_pretrained(directory)
    tensors = {}
    for name, param in smollm2.model.named_parameters():
        module = smollm2.model.get_submodule(name.rsplit(".", 2)[0])
        if ".qkv_proj." in name:
            q, k, v = param.detach().split([module.q_size, module.kv_size, module.kv_size])
            for proj, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                tensors[name.replace("qkv_proj", proj)] = t.contiguous()
        elif ".gate_up_proj." in name:
            gate, up = param.detach().chunk(2)
            tensors[name.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            tensors[name.replace("gate_up_proj", "up_proj")] = up.contiguous()
        else:
            tensors[name] = param.detach().contiguous()
    save_file(tensors, str(directory / "model.safetensors"))
    return str(directory)


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_tokenizer):
    return [smollm2_tokenizer.encode(p) for p in
            ["The capital of France is", "def add(a, b):", "Once upon a time" * 8, "1 2 3"]]


@pytest.fixture(scope="module")
def smollm2_expected(smollm2, smollm2_prompts):
    """TP=1 eager greedy tokens (compiled TP=1 equals eager on these prompts: test_compile_engine)."""
    return _tokens(LLM.from_loaded(smollm2, **{k: v for k, v in ENGINE.items() if k != "dtype"}), smollm2_prompts)


@pytest.mark.parametrize("compilation", [None, PIECEWISE], ids=["eager", "piecewise"])
def test_smollm2_tp2_greedy_equals_tp1(smollm2_dir, smollm2_prompts, smollm2_expected, compilation):
    assert _tp_tokens(smollm2_dir, smollm2_prompts, compilation_config=compilation) == smollm2_expected


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    # Uneven shards everywhere: 5 experts, vocabulary 255, intermediate sizes 33 and 99, 3 KV heads.
    return write_tiny_checkpoint("Qwen3MoeForCausalLM", str(tmp_path_factory.mktemp("moe")), num_experts=5,
                                 vocab_size=255, moe_intermediate_size=33, intermediate_size=99,
                                 num_attention_heads=6, num_key_value_heads=3)


MOE_PROMPTS = [[5, 9, 13, 2, 77], list(range(30, 90)), [101], list(range(200, 240)), [254, 253]]
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_expected(moe_dir):
    """TP=1 eager tokens, greedy and seeded (compiled TP=1 equals eager: test_compile_engine)."""
    reference = LLM(moe_dir, **ENGINE)
    return _tokens(reference, MOE_PROMPTS), _tokens(reference, MOE_PROMPTS[:2], SEEDED)


@pytest.mark.parametrize("compilation", [None, PIECEWISE_SPLIT_AT_ALL_REDUCE], ids=["eager", "piecewise"])
@pytest.mark.parametrize("parallel", [{}, {"enable_expert_parallel": True},
                                      {"enable_expert_parallel": True, "expert_parallel_comm": "all_to_all"}],
                         ids=["tp", "ep", "ep-all-to-all"])
def test_qwen3_moe_tp2_greedy_equals_tp1(moe_dir, moe_expected, compilation, parallel):
    expected, expected_seeded = moe_expected
    llm = LLM(moe_dir, tensor_parallel_size=2, compilation_config=compilation, **parallel, **ENGINE)
    try:
        assert _tokens(llm, MOE_PROMPTS) == expected
        # Seeded sampling: the sampling rank keeps each request's generator across steps.
        assert _tokens(llm, MOE_PROMPTS[:2], SEEDED) == expected_seeded
    finally:
        llm.engine.shutdown()


@pytest.fixture()
def llama_dir(tmp_path):
    return write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "llama"))


@pytest.mark.parametrize("victim,model", [(0, "llama"), (1, "llama"), (1, "moe-all-to-all")])
def test_killed_worker_makes_the_engine_raise_within_seconds(llama_dir, moe_dir, victim, model):
    # The MoE case dies inside the all-to-all exchange: the survivor is left waiting in a collective.
    path, extra = (llama_dir, {}) if model == "llama" else \
        (moe_dir, {"enable_expert_parallel": True, "expert_parallel_comm": "all_to_all"})
    llm = LLM(path, tensor_parallel_size=2, **extra, **ENGINE)
    executor = llm.engine.executor
    _tokens(llm, [[1, 2, 3]])
    pid = executor.pids[victim]
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    with pytest.raises(WorkerError, match=f"rank {victim} \\(pid {pid}\\) (died|has died).*-9"):
        while time.monotonic() - start < 60:
            _tokens(llm, [[1, 2, 3]] * 4, long)
    assert time.monotonic() - start < 10
    killer.join()
    # Every worker is gone, and the engine refuses further work with the same error.
    assert all(not p.is_alive() for p in executor._procs)
    with pytest.raises(WorkerError):
        _tokens(llm, [[1, 2, 3]])


def test_shutdown_stops_every_worker_cleanly(llama_dir):
    llm = LLM(llama_dir, tensor_parallel_size=2, **ENGINE)
    _tokens(llm, [[4, 5, 6]])
    procs = list(llm.engine.executor._procs)
    llm.engine.shutdown()
    assert [p.exitcode for p in procs] == [0, 0]


def test_a_failing_worker_reports_its_error_and_the_engine_stops_all(llama_dir, monkeypatch):
    from runtime.worker.worker import Worker

    def plan(self):
        if self.rank == 1:
            raise RuntimeError("no memory for the KV cache on this rank")
        return 64

    monkeypatch.setattr(Worker, "plan_kv_blocks", plan)  # workers are forked on CPU: they see the patch
    with pytest.raises(WorkerError, match="rank 1 failed during 'plan_kv_blocks': RuntimeError: no memory for the KV cache"):
        LLM(llama_dir, tensor_parallel_size=2, **ENGINE)


def test_graph_replays_are_counted_from_the_workers():
    """The workers replay the graphs in their own processes; the engine (and /metrics) must count
    them all the same (they read 0 when the engine looked at its own process's counters)."""
    from tests.helpers.fake_platform import run_with_fake_platform

    report = run_with_fake_platform("from tests.helpers import fake_platform; fake_platform.tensor_parallel_main()")
    tp = report["tp2_full"]
    assert tp["tokens"] == report["eager"]["tokens"]
    assert report["engine_process_replays"] == 0
    # Every decode step of at most 4 sequences replays a full graph; the prefill steps run eagerly.
    assert 0 < tp["replays"] < tp["steps"]
    assert tp["replays"] + tp["eager_steps"] == tp["steps"]
