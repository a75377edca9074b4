"""CUDA: the default config compiles and captures (full + piecewise, the default ladders), gives eager's
greedy tokens, and enforce_eager turns both off."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    print(f"skipping {__name__}: CUDA is not available")
    pytest.skip("CUDA is not available", allow_module_level=True)

from compiler import CompilationConfig, counters  # noqa: E402
from models.loader import load_model  # noqa: E402
from models.testing import write_tiny_checkpoint  # noqa: E402
from runtime import LLM  # noqa: E402
from runtime.contracts.sampling_params import SamplingParams  # noqa: E402

PROMPTS = [list(range(30, 90)), [5, 9, 13, 2, 77], list(range(100, 140)), [101]] * 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path_factory.mktemp("ckpt")))


def _tokens(llm):
    params = [SamplingParams(temperature=0.0, max_tokens=10 + i, ignore_eos=True) for i in range(len(PROMPTS))]
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_default_config_captures_both_kinds_and_keeps_eagers_tokens(checkpoint):
    config = CompilationConfig()
    assert (config.mode, config.graph_mode) == ("compile", "full_and_piecewise")
    eager = _tokens(LLM(checkpoint, dtype="float32", enforce_eager=True, max_num_seqs=16, max_model_len=512,
                        kv_cache_memory_gb=1))
    counters.reset()
    loaded = load_model(checkpoint, dtype="float32", device="cuda")
    llm = LLM.from_loaded(loaded, max_num_seqs=16, max_model_len=512, kv_cache_memory_gb=1)
    graphs = llm.engine.executor.worker.runner.graphs
    assert graphs.dispatcher.full_sizes == [1, 2, 4, 8, 16]
    assert graphs.dispatcher.piecewise_sizes[-1] == 512 and counters.graphs_captured > 0
    assert _tokens(llm) == eager
    assert counters.graph_replays > 0


def test_enforce_eager_on_cuda_runs_without_compiling_or_capturing(checkpoint):
    counters.reset()
    llm = LLM(checkpoint, dtype="float32", enforce_eager=True, max_num_seqs=4, max_model_len=256,
              kv_cache_memory_gb=0.5)
    config = llm.engine.config.compilation_config
    assert (config.mode, config.graph_mode) == ("eager", "none")
    assert _tokens(llm) and counters.dynamo_traces == 0 and counters.graphs_captured == 0
