"""enforce_eager (vLLM's flag): no compilation and no static graphs, whatever compilation_config says."""
import logging

import pytest

from compiler import CompilationConfig, counters
from models.loader import load_model
from models.testing import write_tiny_checkpoint
from runtime import LLM
from runtime.contracts.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 9, 13, 2, 77], list(range(30, 60))]
COMPILED = {"mode": "compile", "backend": "eager", "graph_mode": "piecewise", "capture_sizes": [1, 2, 4]}
SMALL = dict(dtype="float32", max_num_seqs=4, max_model_len=64, num_kv_blocks=32, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path_factory.mktemp("ckpt")))


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_enforce_eager_overrides_a_compilation_config_and_says_so(llama, caplog):
    eager = _tokens(LLM(llama, **SMALL))
    counters.reset()
    with caplog.at_level(logging.WARNING, logger="runtime.contracts.config"):
        llm = LLM(llama, compilation_config=COMPILED, enforce_eager=True, **SMALL)
    assert any(r.getMessage() == "enforce_eager: compilation_config (mode=compile, graph_mode=piecewise) ignored, "
               "the model runs eagerly" for r in caplog.records)
    config = llm.engine.config.compilation_config
    assert (config.mode, config.graph_mode) == ("eager", "none")
    assert _tokens(llm) == eager
    assert counters.dynamo_traces == 0 and counters.graphs_captured == 0


def test_enforce_eager_cannot_undo_a_model_built_compiled(llama):
    loaded = load_model(llama, dtype="float32", device="cpu", compilation_config=CompilationConfig(**COMPILED))
    with pytest.raises(ValueError, match="enforce_eager=True, but this model was built with compilation"):
        LLM.from_loaded(loaded, enforce_eager=True, **{k: v for k, v in SMALL.items() if k != "dtype"})


def test_serve_flag_reaches_the_engine_config(monkeypatch):
    import runtime.engine.core as core
    from runtime.serve.cli import build_parser
    from runtime.serve.server import _build_engine

    seen = {}

    class Stop(Exception):
        pass

    def fake_core(config):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(core, "EngineCore", fake_core)
    args = build_parser().parse_args(["--enforce-eager", "--compilation-config", '{"mode": "compile"}'])
    with pytest.raises(Stop):
        _build_engine(args)
    assert seen["config"].enforce_eager and seen["config"].compilation_config.mode == "eager"
    assert "--enforce-eager" in build_parser().format_help()


def test_the_default_config_is_the_platforms_and_says_so(caplog):
    """CompilationConfig() is the platform's default: eager on CPU (CUDA: compile + full_and_piecewise,
    checked in tests/gpu); the engine names it in one log line."""
    from runtime.contracts.config import EngineConfig
    from runtime.platforms import current_platform

    assert current_platform.name == "cpu"
    assert (CompilationConfig().mode, CompilationConfig().graph_mode) == ("eager", "none")
    with caplog.at_level(logging.INFO, logger="runtime.contracts.config"):
        EngineConfig(model="unused")
    assert [r.getMessage() for r in caplog.records] == [
        "compilation: the cpu platform's default, mode=eager graph_mode=none"]
    # Left to the platform, then resolved: an explicit eager mode means no graphs anywhere.
    assert CompilationConfig(mode="eager").graph_mode == "none"
    assert CompilationConfig.eager().is_eager


def test_a_device_platforms_default_compiles_and_captures(monkeypatch):
    from runtime.platforms.cuda import CudaPlatform
    import compiler.config as config_module

    monkeypatch.setattr(config_module, "current_platform", CudaPlatform())
    config = CompilationConfig()
    assert (config.mode, config.graph_mode, config.backend) == ("compile", "full_and_piecewise", None)
    assert CompilationConfig(mode="eager").graph_mode == "none"
    assert CompilationConfig(graph_mode="piecewise").mode == "compile"
