"""mode="compile" through the engine: greedy tokens identical to eager, one trace for every step."""
import json

import pytest

from compiler import CompilationConfig, counters
from models.loader import load_model
from models.testing import write_tiny_checkpoint
from passes.manager import default_pass_names
from runtime import LLM
from runtime.contracts.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _run(loaded, prompts):
    llm = LLM.from_loaded(loaded, max_num_seqs=8, max_model_len=256, num_kv_blocks=128,
                          max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.kv_cache.num_used_blocks == 0
    return [o.outputs[0].token_ids for o in outs]


def test_smollm2_compiled_equals_eager_with_and_without_passes(smollm2, smollm2_path, smollm2_tokenizer, tmp_path):
    prompts = [smollm2_tokenizer.encode(p) for p in
               ["The capital of France is", "def add(a, b):", "Once upon a time" * 8, "1 2 3"]]
    eager = _run(smollm2, prompts)
    layers = smollm2.config.num_hidden_layers
    for passes in (["default"], []):
        counters.reset()
        compiled = load_model(smollm2_path, dtype="float32", device="cpu", compilation_config=CompilationConfig(
            mode="compile", backend="eager", passes=passes, dump_dir=str(tmp_path / f"dump{len(passes)}")))
        assert _run(compiled, prompts) == eager
        # One trace served the warm-up, chunked prefills (64-token budget) and every decode size.
        assert counters.dynamo_traces == 1
        assert counters.piecewise_graphs == layers + 1
    manifest = json.loads((tmp_path / "dump1" / "decoder" / "manifest.json").read_text())
    matches = {p["name"]: p["matches"] for p in manifest["passes"]}
    # What a Llama-style decoder implies: every residual add feeding a norm except the last
    # (2 per layer - 1), the first and the final norm alone, one SwiGLU and one rotary per layer.
    assert matches["fuse_add_rms_norm"] == 2 * layers - 1
    assert matches["fuse_rms_norm"] == 2
    assert matches["fuse_silu_mul"] == layers and matches["fuse_rotary"] == layers
    # Nothing copies or clones the attention outputs: the op writes its buffer in place, and the
    # pieces around it read that buffer directly.
    final = (tmp_path / "dump1" / "decoder" / "after_fuse_silu_mul.py").read_text()
    assert "copy_" not in final and "clone" not in final
    assert "graphmode.fused_add_rms_norm" in final and "aten.rsqrt" not in final


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_tiny_qwen3_moe_compiled_equals_eager(tmp_path, backend):
    path = write_tiny_checkpoint("Qwen3MoeForCausalLM", str(tmp_path / "moe"))
    prompts = [[5, 9, 13, 2, 77], list(range(30, 90)), [101], list(range(200, 240))]
    eager = _run(load_model(path, dtype="float32", device="cpu"), prompts)
    counters.reset()
    # The fusions named explicitly: "default" under Inductor is the clean-up alone (it fuses on its own),
    # and the fused ops must still compile with it when a user asks for them; fuse_norm_linear is opt-in.
    compiled = load_model(path, dtype="float32", device="cpu", compilation_config=CompilationConfig(
        mode="compile", backend=backend, passes=default_pass_names() + ["fuse_norm_linear"]))
    assert _run(compiled, prompts) == eager
    assert counters.dynamo_traces == 1
    # Qwen3 attention: q/k RMSNorm + rotary fused per layer; layer 1 is dense (mlp_only_layers).
    assert counters.pass_matches["fuse_qk_norm_rotary"] == 2
    assert counters.pass_matches["fuse_add_rms_norm"] == 3 and counters.pass_matches["fuse_silu_mul"] == 1
    # Both q/k/v projections and the dense layer's gate/up; the MoE layer's norm also feeds its router.
    assert counters.pass_matches["fuse_norm_linear"] == 3


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
