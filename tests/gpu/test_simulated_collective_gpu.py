"""CUDA: the simulated collective runs on its communication stream, captures into graphs, and keeps tokens."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    print(f"skipping {__name__}: CUDA is not available")
    pytest.skip("CUDA is not available", allow_module_level=True)

from compiler import counters  # noqa: E402
from models.testing import write_tiny_checkpoint  # noqa: E402
from runtime import LLM  # noqa: E402
from runtime.contracts.sampling_params import SamplingParams  # noqa: E402

PROMPTS = [list(range(30, 90)), [5, 9, 13, 2, 77], list(range(100, 140)), [101]] + \
          [[i, (7 * i) % 250, 3] for i in range(20)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_simulated_collectives_capture_and_keep_the_tokens(tmp_path):
    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "ckpt"))
    common = dict(dtype="float32", max_num_seqs=32, max_model_len=128, kv_cache_memory_gb=0.5,
                  max_num_batched_tokens=64)
    plain = [o.outputs[0].token_ids for o in LLM(path, **common).generate(PROMPTS, GREEDY, use_tqdm=False)]
    counters.reset()
    llm = LLM(path, simulate_collective_us=30, enable_dbo=True, dbo_decode_token_threshold=8,
              dbo_prefill_token_threshold=16, **common)
    graphs = llm.engine.executor.worker.runner.graphs
    assert graphs.dispatcher.full and graphs.dispatcher.piecewise, "every capture succeeded"
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == plain
    assert llm.engine.executor.worker.runner.dbo_steps > 0 and counters.graph_replays > 0
