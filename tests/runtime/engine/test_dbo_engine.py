"""DBO through the engine (TP=1): greedy tokens identical with and without micro-batching."""
import pytest

import runtime.worker.model_runner as model_runner
from compiler import CompilationConfig
from models.loader import load_model
from models.testing import write_tiny_checkpoint
from runtime import LLM
from runtime.contracts.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
# Long prompts are chunked by the 64-token budget, so prefill steps split (and cut a prompt in
# two); the many short ones make decode steps of 20+ requests, which split too.
PROMPTS = [list(range(30, 90)), [5, 9, 13, 2, 77], list(range(100, 140)), [101]] + \
          [[i, (7 * i) % 250, 3] for i in range(20)]


def _generate(loaded, dbo, record=None):
    llm = LLM.from_loaded(loaded, max_num_seqs=32, max_model_len=128, num_kv_blocks=256, max_num_batched_tokens=64,
                          enable_dbo=dbo, force_dbo=dbo, dbo_decode_token_threshold=8, dbo_prefill_token_threshold=16)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    runner = llm.engine.executor.worker.runner
    assert llm.engine.kv_cache.num_used_blocks == 0
    if record is not None:
        record["dbo_steps"], record["steps"] = runner.dbo_steps, llm.engine.num_steps
        record["threads"] = runner.ubatch_threads is not None
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch,compiled", [("LlamaForCausalLM", False), ("LlamaForCausalLM", True),
                                           ("Qwen3MoeForCausalLM", False)])
def test_dbo_on_and_off_give_identical_greedy_tokens(tmp_path, monkeypatch, arch, compiled):
    path = write_tiny_checkpoint(arch, str(tmp_path / "ckpt"))
    # Compiled piecewise: on CPU the graph mode degrades to running the compiled pieces.
    cfg = CompilationConfig(mode="compile", backend="eager", graph_mode="piecewise",
                            capture_sizes=[1, 2, 4, 8, 16, 32]) if compiled else None
    splits = []
    original = model_runner.plan_ubatches
    monkeypatch.setattr(model_runner, "plan_ubatches",
                        lambda q, t: splits.append((list(q), original(q, t))) or splits[-1][1])
    off = _generate(load_model(path, dtype="float32", device="cpu", compilation_config=cfg), dbo=False)
    assert splits == []  # DBO off: no split is even planned
    record = {}
    on = _generate(load_model(path, dtype="float32", device="cpu", compilation_config=cfg), dbo=True, record=record)
    assert on == off
    done = [s for _, s in splits if s]
    assert record["dbo_steps"] == len(done) > 0
    assert not record["threads"]  # one process, no collective to yield at: micro-batches run in turn
    # Both kinds of split happened: a decode-only one, and one that cut a prefill between micro-batches.
    assert any(max(q) == 1 for q, s in splits if s)
    assert any(s[0].rows.stop - 1 == s[1].rows.start for s in done)


def test_dbo_on_one_device_is_off_by_policy_unless_forced(tmp_path, caplog):
    """With nothing communicating, two micro-batches only add work: enable_dbo alone splits nothing (one log
    line says so, and switching it on leaves it off); force_dbo splits; force_dbo alone is an error."""
    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "ckpt"))
    loaded = load_model(path, dtype="float32", device="cpu")
    with caplog.at_level("WARNING", logger="runtime.engine.core"):
        llm = LLM.from_loaded(loaded, max_num_seqs=32, max_model_len=128, num_kv_blocks=256, max_num_batched_tokens=64,
                              enable_dbo=True, dbo_decode_token_threshold=8, dbo_prefill_token_threshold=16)
    dbo_lines = [r.getMessage() for r in caplog.records if "DBO" in r.getMessage()]
    assert len(dbo_lines) == 1 and dbo_lines[0].startswith("DBO off on one device")
    assert llm.engine.config.dbo_thresholds() is None
    llm.engine.set_dbo(True)
    unsplit = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert llm.engine.executor.worker.runner.dbo_steps == 0
    record = {}
    assert _generate(loaded, dbo=True, record=record) == unsplit
    assert record["dbo_steps"] > 0
    with pytest.raises(ValueError, match="force_dbo=True needs enable_dbo=True"):
        LLM.from_loaded(loaded, max_num_seqs=4, max_model_len=32, num_kv_blocks=16, force_dbo=True)


def test_dbo_on_smollm2_matches_off(smollm2, smollm2_tokenizer):
    prompts = [smollm2_tokenizer.encode(p) for p in ["The capital of France is", "def add(a, b):",
                                                      "Once upon a time" * 6, "1 2 3"]] * 3
    runs = []
    for dbo in (False, True):
        llm = LLM.from_loaded(smollm2, max_num_seqs=16, max_model_len=128, num_kv_blocks=128,
                              max_num_batched_tokens=48, enable_dbo=dbo, force_dbo=dbo, dbo_decode_token_threshold=4,
                              dbo_prefill_token_threshold=16)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)])
        assert (llm.engine.executor.worker.runner.dbo_steps > 0) == dbo
    assert runs[0] == runs[1]


# Compiled TP=2 runs only with DBO on (two ranks compiling on two cores is the slow part); TP=2
# without DBO against TP=1 is the tensor-parallel tests' business.
@pytest.mark.parametrize("arch,compiled,ep,dbo_modes", [
    ("LlamaForCausalLM", False, False, (False, True)),
    ("LlamaForCausalLM", True, False, (True,)),
    ("Qwen3MoeForCausalLM", False, True, (True,)),  # expert parallel: yields at the MoE combine too
    ("Qwen3MoeForCausalLM", False, "all_to_all", (True,)),  # and at the dispatch, by all-to-all
], ids=["eager", "compiled", "moe-ep", "moe-ep-all-to-all"])
def test_dbo_with_tensor_parallel_2_matches_tp1_and_interleaves(tmp_path, arch, compiled, ep, dbo_modes):
    path = write_tiny_checkpoint(arch, str(tmp_path / "ckpt"))
    cfg = dict(mode="compile", backend="eager", graph_mode="piecewise", capture_sizes=[1, 2, 4, 8, 16, 32]) \
        if compiled else None
    reference = _generate(load_model(path, dtype="float32", device="cpu"), dbo=False)
    for dbo in dbo_modes:
        llm = LLM(path, dtype="float32", max_num_seqs=32, max_model_len=128, num_kv_blocks=256,
                  max_num_batched_tokens=64, enable_dbo=dbo, dbo_decode_token_threshold=8,
                  dbo_prefill_token_threshold=16, tensor_parallel_size=2, enable_expert_parallel=bool(ep),
                  expert_parallel_comm="all_to_all" if ep == "all_to_all" else "all_reduce", compilation_config=cfg)
        try:
            tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
            stats = llm.engine.executor.call_workers("dbo_stats")
        finally:
            llm.engine.shutdown()
        assert tokens == reference
        if not dbo:
            assert all(steps == 0 for steps, _ in stats)
            continue
        for steps, trace in stats:  # every rank split the same steps and interleaved the same way
            assert steps > 0
            labels = [p.label for p in trace if p.ubatch == 0 and p.action == "launch"]
            assert len(labels) >= 4  # two all-reduces per layer at least
            assert [(p.ubatch, p.action, p.label) for p in trace] == _alternation(labels)
            assert ("moe_combine" in labels) == bool(ep) and ("moe_dispatch" in labels) == (ep == "all_to_all")
        assert stats[0][1] == stats[1][1]


def _alternation(labels):
    """Micro-batch 0 launches, 1 runs up to its own launch, 0 resumes (waits) and runs to its next
    launch, then 1 resumes, and so on: every communication overlaps the sibling's compute."""
    order = [(0, "launch", labels[0]), (1, "launch", labels[0])]
    for i, label in enumerate(labels):
        nxt = labels[i + 1] if i + 1 < len(labels) else None
        for ub in (0, 1):
            order.append((ub, "resume", label))
            if nxt is not None:
                order.append((ub, "launch", nxt))
    return order


@pytest.mark.parametrize("compiled", [False, True])
def test_simulated_collectives_make_dbo_overlap_on_one_device(tmp_path, compiled):
    """simulate_collective_us puts graphmode::simulated_collective where a TP all-reduce would be: DBO's policy
    then splits on one device, the micro-batches alternate at every simulated all-reduce as under TP=2, and the
    tokens are those of the plain model (the op passes its input through)."""
    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "ckpt"))
    cfg = dict(mode="compile", backend="eager", graph_mode="piecewise", capture_sizes=[1, 2, 4, 8, 16, 32]) \
        if compiled else None
    reference = _generate(load_model(path, dtype="float32", device="cpu"), dbo=False)
    llm = LLM(path, dtype="float32", max_num_seqs=32, max_model_len=128, num_kv_blocks=256, max_num_batched_tokens=64,
              enable_dbo=True, dbo_decode_token_threshold=8, dbo_prefill_token_threshold=16,
              simulate_collective_us=20, compilation_config=cfg)
    assert llm.engine.config.dbo_active
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == reference
    steps, trace = llm.engine.executor.worker.dbo_stats()
    labels = [p.label for p in trace if p.ubatch == 0 and p.action == "launch"]
    assert steps > 0 and len(labels) == 4 and set(labels) == {"tp_all_reduce"}  # 2 layers x (o_proj, down_proj)
    assert [(p.ubatch, p.action, p.label) for p in trace] == _alternation(labels)


def test_simulated_collectives_need_one_device_and_a_model_built_for_them(tmp_path):
    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="simulate_collective_us stands in for collectives on one device"):
        LLM(path, tensor_parallel_size=2, simulate_collective_us=10)
    loaded = load_model(path, dtype="float32", device="cpu")  # built without simulated collectives
    with pytest.raises(ValueError, match=r"simulate_collective_us=10, but this model was built with \[0\.0\]"):
        LLM.from_loaded(loaded, max_num_seqs=4, max_model_len=32, num_kv_blocks=16, simulate_collective_us=10)
