"""Qwen3-MoE on CUDA (bf16, the grouped-GEMM ``fused_moe``): full and piecewise graphs capture and replay
and give eager's greedy tokens, on the tiny model and on the Qwen3-30B-A3B shape cut to 8 layers."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
    print(f"skipping {__name__}: needs a CUDA device of compute capability 9.0 or later")
    pytest.skip("needs a CUDA device of compute capability 9.0 or later", allow_module_level=True)

from compiler import CompilationConfig, counters  # noqa: E402
from models.loader import LoadedModel  # noqa: E402
from models.testing import build_random_model, qwen3_30b_a3b_config, tiny_config  # noqa: E402
from runtime import LLM  # noqa: E402
from runtime.contracts.sampling_params import SamplingParams  # noqa: E402
from runtime.platforms import current_platform  # noqa: E402

SIZES = [1, 2, 4, 8]
# Without the fusion passes: the graphs must replay what the same code computes eagerly.
MODES = {"none": dict(mode="eager"),
         "piecewise": dict(mode="compile", backend="eager", graph_mode="piecewise", capture_sizes=SIZES, passes=[]),
         "full": dict(mode="eager", graph_mode="full", capture_sizes=SIZES)}
CONFIGS = {"tiny": lambda: tiny_config("Qwen3MoeForCausalLM"), "30b-a3b-8l": qwen3_30b_a3b_config}


def _run(config, mode):
    counters.reset()
    comp = CompilationConfig(**MODES[mode])
    model = build_random_model(config, torch.bfloat16, torch.device("cuda"), compilation_config=comp)
    loaded = LoadedModel(model, config, None, torch.bfloat16, torch.device("cuda"), comp)
    llm = LLM.from_loaded(loaded, max_num_seqs=8, max_model_len=256, max_num_batched_tokens=256, num_kv_blocks=256)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, config.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 40, 9, 75, 5)]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * len(prompts)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    out = dict(tokens=tokens, captured=counters.graphs_captured, replays=counters.graph_replays)
    llm.shutdown()
    del llm, loaded, model
    current_platform.empty_cache()
    return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def results(request):
    config = CONFIGS[request.param]()
    return {mode: _run(config, mode) for mode in MODES}


@pytest.mark.parametrize("mode", ["piecewise", "full"])
def test_graphs_capture_replay_and_keep_eagers_greedy_tokens(results, mode):
    assert results[mode]["captured"] >= len(SIZES) and results[mode]["replays"] > 0
    assert results[mode]["tokens"] == results["none"]["tokens"]
