"""mode="compile" through the engine: greedy tokens identical to eager, one trace for every step."""
import pytest

from compiler import CompilationConfig, counters
from models.loader import load_model
from models.testing import write_tiny_checkpoint
from runtime.engine import LLM
from runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _run(loaded, prompts):
    llm = LLM.from_loaded(loaded, max_num_seqs=8, max_model_len=256, num_kv_blocks=128,
                          max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.kv_cache.num_used_blocks == 0
    return [o.outputs[0].token_ids for o in outs]


def test_smollm2_compiled_equals_eager(smollm2, smollm2_path, smollm2_tokenizer):
    prompts = [smollm2_tokenizer.encode(p) for p in
               ["The capital of France is", "def add(a, b):", "Once upon a time" * 8, "1 2 3"]]
    eager = _run(smollm2, prompts)
    counters.reset()
    compiled = load_model(smollm2_path, dtype="float32", device="cpu",
                          compilation_config=CompilationConfig(mode="compile", backend="eager"))
    assert _run(compiled, prompts) == eager
    # One trace served the warm-up, chunked prefills (64-token budget) and every decode size.
    assert counters.dynamo_traces == 1
    assert counters.piecewise_graphs == compiled.config.num_hidden_layers + 1


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_tiny_qwen3_moe_compiled_equals_eager(tmp_path, backend):
    path = write_tiny_checkpoint("Qwen3MoeForCausalLM", str(tmp_path / "moe"))
    prompts = [[5, 9, 13, 2, 77], list(range(30, 90)), [101], list(range(200, 240))]
    eager = _run(load_model(path, dtype="float32", device="cpu"), prompts)
    counters.reset()
    compiled = load_model(path, dtype="float32", device="cpu",
                          compilation_config=CompilationConfig(mode="compile", backend=backend))
    assert _run(compiled, prompts) == eager
    assert counters.dynamo_traces == 1


@pytest.mark.parametrize("graph_mode", ["piecewise", "full", "full_and_piecewise"])
def test_graph_modes_degrade_on_cpu_with_a_log_line(tmp_path, caplog, graph_mode):
    import logging

    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "llama"))
    prompts = [[5, 9, 13], list(range(30, 60))]
    eager = _run(load_model(path, dtype="float32", device="cpu"), prompts)
    counters.reset()
    with caplog.at_level(logging.INFO):
        compiled = load_model(path, dtype="float32", device="cpu", compilation_config=CompilationConfig(
            mode="compile", backend="eager", graph_mode=graph_mode, capture_sizes=[1, 2, 4, 8]))
        assert _run(compiled, prompts) == eager
    assert "no static graphs" in caplog.text
    assert counters.graphs_captured == 0 and counters.dynamo_traces == 1
