"""Static graphs on CUDA: every graph mode gives the same greedy tokens; captures and replays counted."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    print(f"skipping {__name__}: CUDA is not available")
    pytest.skip("CUDA is not available", allow_module_level=True)

from compiler import CompilationConfig, counters  # noqa: E402
from models.loader import load_model  # noqa: E402
from runtime import LLM  # noqa: E402
from runtime.contracts.sampling_params import SamplingParams  # noqa: E402

SIZES = [1, 2, 4, 8, 16, 32]
# The graph modes run without the fusion passes: graphs must replay exactly what the same code
# computes without them. The passes are compared on their own below.
MODES = {
    "none": dict(mode="eager"),
    "piecewise": dict(mode="compile", backend="eager", graph_mode="piecewise", capture_sizes=SIZES, debug=True,
                      passes=[]),
    "full": dict(mode="eager", graph_mode="full", capture_sizes=SIZES, debug=True),
    # Fused kernels against the unfused ops, without graphs, and both graph kinds with the passes.
    "compiled_no_passes": dict(mode="compile", backend="eager", passes=[]),
    "compiled_passes": dict(mode="compile", backend="eager"),
    "default_piecewise": dict(mode="compile", backend="eager", graph_mode="full_and_piecewise", capture_sizes=SIZES),
}
NATURAL = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three primary colors:", "Water boils at", "The quick brown fox", "import numpy as np\n",
           "Translate to French: good morning"]


def _workload(tokenizer):
    g = torch.Generator().manual_seed(0)
    prompts, params = [], []
    for i in range(32):
        length = [3, 9, 17, 40, 75, 130][i % 6]
        prompts.append(torch.randint(100, tokenizer.vocab_size - 1, (length,), generator=g).tolist())
        params.append(SamplingParams(temperature=0.0, max_tokens=8 + (i % 5) * 4, ignore_eos=True))
    return prompts, params


@pytest.fixture(scope="module")
def results(smollm2_path):
    out = {}
    for name, cfg in MODES.items():
        counters.reset()
        loaded = load_model(smollm2_path, dtype="bfloat16", device="cuda",
                            compilation_config=CompilationConfig(**cfg))
        llm = LLM.from_loaded(loaded, max_num_seqs=16, max_model_len=512, max_num_batched_tokens=256,
                              num_kv_blocks=512)
        captured = counters.graphs_captured
        prompts, params = _workload(llm.tokenizer)
        natural = [llm.tokenizer.encode(p) for p in NATURAL]
        natural_params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5)] * len(natural)
        outs = llm.generate(prompts + natural, params + natural_params, use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in outs[:len(prompts)]]
        natural_tokens = [o.outputs[0].token_ids for o in outs[len(prompts):]]
        natural_logprobs = [o.outputs[0].logprobs for o in outs[len(prompts):]]
        out[name] = dict(tokens=tokens, natural=natural_tokens, natural_logprobs=natural_logprobs,
                         captured=captured, replays=counters.graph_replays,
                         pass_matches=sum(counters.pass_matches.values()),
                         pieces=counters.piecewise_graphs, free=llm.engine.kv_cache.num_used_blocks == 0)
        del llm, loaded
        torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("mode", ["piecewise", "full"])
def test_greedy_tokens_identical_across_graph_modes(results, mode):
    assert results[mode]["tokens"] == results["none"]["tokens"]
    assert results[mode]["free"]


def test_one_capture_per_size_per_mode_and_replays(results):
    full_sizes = [s for s in SIZES if s <= 16]  # full graphs are bounded by max_num_seqs
    assert results["none"]["captured"] == 0
    assert results["full"]["captured"] == len(full_sizes)
    assert results["piecewise"]["captured"] == len(SIZES) * results["piecewise"]["pieces"]
    both = results["default_piecewise"]
    assert both["captured"] == len(full_sizes) + len(SIZES) * both["pieces"]
    for mode in ("piecewise", "full", "default_piecewise"):
        assert results[mode]["replays"] > 0


def _diverging(a: list[list[int]], b: list[list[int]]) -> list[tuple[int, int]]:
    """(sequence, first differing position) for each sequence whose tokens differ."""
    out = []
    for i, (s, t) in enumerate(zip(a, b)):
        if s != t:
            out.append((i, next((j for j, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t)))))
    return out


def _divergence_gaps(tokens, reference, reference_logprobs):
    """(sequence, position, gap) where ``tokens`` first leaves ``reference``: gap is how much more
    likely the reference found its own token than the other one (inf: not in its top 5)."""
    gaps = []
    for seq, pos in _diverging(tokens, reference):
        if pos >= min(len(tokens[seq]), len(reference[seq])):
            gaps.append((seq, pos, float("inf")))
            continue
        own, top = reference_logprobs[seq][pos]
        other = dict(top or []).get(tokens[seq][pos])
        gaps.append((seq, pos, float("inf") if other is None else own - other))
    return gaps


@pytest.mark.parametrize("fused, unfused", [("compiled_passes", "none"), ("default_piecewise", "piecewise")])
def test_fusion_passes_keep_bf16_greedy_tokens(results, fused, unfused):
    """The fused kernels round where the unfused ops round and sum RMSNorm's squares in torch's own
    order (runtime/ops/reduction_order.py), so in bf16 the fused model is bit-identical to the unfused
    one at the same batch shapes: eager against compiled without graphs, and piecewise graphs without
    passes against the default graphs with them (both padded to the same capture sizes)."""
    assert results["compiled_no_passes"]["pass_matches"] == 0
    assert results[fused]["pass_matches"] > 0
    # Same kernels, only compiled: bit-identical.
    assert results["compiled_no_passes"]["natural"] == results["none"]["natural"]
    assert results["compiled_no_passes"]["tokens"] == results["none"]["tokens"]
    reference = results[unfused]
    gaps = _divergence_gaps(results[fused]["natural"], reference["natural"], reference["natural_logprobs"])
    print(f"{fused} vs {unfused}: natural prompts diverging (sequence, position, log-prob gap): {gaps}; "
          f"random prompts (sequence, position): {_diverging(results[fused]['tokens'], reference['tokens'])}")
    assert results[fused]["natural"] == reference["natural"]
    assert results[fused]["tokens"] == reference["tokens"]
