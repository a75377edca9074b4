"""DBO on CUDA with static graphs: micro-batches on their own streams replay their own graphs, and the
greedy tokens equal DBO off in every graph mode (float32, so only the split can change a token)."""
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
MODES = {
    "none": dict(mode="eager"),
    "piecewise": dict(mode="compile", backend="eager", graph_mode="piecewise", capture_sizes=SIZES, debug=True),
    "full": dict(mode="eager", graph_mode="full", capture_sizes=SIZES, debug=True),
    "full_and_piecewise": dict(mode="compile", backend="eager", graph_mode="full_and_piecewise",
                               capture_sizes=SIZES),
}


def _workload(vocab):
    g = torch.Generator().manual_seed(0)
    prompts, params = [], []
    for i in range(32):
        length = [3, 9, 17, 40, 75, 130][i % 6]
        prompts.append(torch.randint(100, vocab - 1, (length,), generator=g).tolist())
        params.append(SamplingParams(temperature=0.0, max_tokens=8 + (i % 5) * 4, ignore_eos=True))
    return prompts, params


@pytest.fixture(scope="module")
def results(smollm2_path):
    out = {}
    for name, cfg in MODES.items():
        for dbo in (False, True):
            counters.reset()
            loaded = load_model(smollm2_path, dtype="float32", device="cuda",
                                compilation_config=CompilationConfig(**cfg))
            llm = LLM.from_loaded(loaded, max_num_seqs=16, max_model_len=512, max_num_batched_tokens=256,
                                  num_kv_blocks=512, enable_dbo=dbo, force_dbo=dbo, dbo_decode_token_threshold=8,
                                  dbo_prefill_token_threshold=32)
            captured = counters.graphs_captured
            prompts, params = _workload(loaded.config.vocab_size)
            tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            out[name, dbo] = dict(tokens=tokens, captured=captured, replays=counters.graph_replays,
                                  dbo_steps=llm.engine.executor.worker.runner.dbo_steps,
                                  free=llm.engine.kv_cache.num_used_blocks == 0)
            del llm, loaded
            torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_dbo_on_and_off_give_identical_tokens(results, mode):
    off, on = results[mode, False], results[mode, True]
    assert on["dbo_steps"] > 0 and off["dbo_steps"] == 0
    assert on["tokens"] == off["tokens"]
    assert on["free"]


@pytest.mark.parametrize("mode", ["piecewise", "full", "full_and_piecewise"])
def test_each_micro_batch_slot_has_its_own_graphs(results, mode):
    off, on = results[mode, False], results[mode, True]
    # max_num_batched_tokens=256: a micro-batch may hold up to 128 tokens, so each of the two slots
    # captures every piecewise size the whole step does; full graphs (16 sequences at most) go up to 8
    # sequences per micro-batch: one size fewer.
    fewer = 1 if mode != "piecewise" else 0
    assert off["captured"] > 0 and on["captured"] == 3 * off["captured"] - 2 * fewer
    assert on["replays"] > 0
