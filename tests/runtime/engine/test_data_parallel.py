"""Data parallelism on CPU: engine cores in processes of their own behind ``DataParallelClient``.

A dense model's cores run independently and balance the load; a MoE model's experts split over the
data-parallel ranks keep the cores in lockstep (a core with no requests runs dummy steps so that its
peers' all-to-alls complete). Greedy tokens must equal one engine's either way.
"""
import pytest

from models.testing import write_tiny_checkpoint
from runtime import LLM
from runtime.contracts.config import EngineConfig
from runtime.contracts.sampling_params import SamplingParams
from runtime.engine.dp_client import DataParallelClient

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
ENGINE = dict(max_num_seqs=8, max_model_len=256, num_kv_blocks=96, max_num_batched_tokens=64, dtype="float32")
PROMPTS = [[5, 9, 13, 2, 77], list(range(30, 90)), [101], list(range(200, 240)), [254, 253], [7, 7, 7]]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return write_tiny_checkpoint("Qwen3MoeForCausalLM", str(tmp_path_factory.mktemp("moe")), num_experts=5,
                                 vocab_size=255, moe_intermediate_size=33, intermediate_size=99,
                                 num_attention_heads=6, num_key_value_heads=3)


def _reference(path):
    llm = LLM(path, **ENGINE)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _run(client, pinned=None):
    """Every prompt through the client (pinned to one core, or balanced); the outputs by prompt."""
    for i, prompt in enumerate(PROMPTS):
        client.add_request(str(i), prompt, GREEDY, data_parallel_rank=pinned)
    done = {}
    while client.has_unfinished_requests():
        for out in client.step():
            if out.finished:
                done[out.request_id] = out
        assert not client.take_failed_requests()
    return [done[str(i)] for i in range(len(PROMPTS))]


def test_dense_cores_share_the_load_and_match_one_engine(moe_dir):
    expected = _reference(moe_dir)
    llm = LLM(moe_dir, data_parallel_size=2, **ENGINE)
    try:
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert {o.engine_index for o in outputs} == {0, 1}  # least-loaded placement spreads a burst
        with pytest.raises(ValueError, match=r"data_parallel_rank must be in \[0, 2\)"):
            llm.engine.add_request("bad", [1, 2], GREEDY, data_parallel_rank=2)
        with pytest.raises(ValueError, match="prompt token ids must be in"):
            llm.engine.add_request("bad", [1, 999], GREEDY)
    finally:
        llm.shutdown()


def test_experts_over_data_parallel_ranks_step_in_lockstep(moe_dir):
    expected = _reference(moe_dir)
    config = EngineConfig(moe_dir, data_parallel_size=2, enable_expert_parallel=True, **ENGINE)
    client = DataParallelClient(config)
    try:
        outputs = _run(client, pinned=0)  # rank 1 has nothing: it runs dummy steps for rank 0's all-to-alls
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert {o.engine_index for o in outputs} == {0}
        assert client.stats()[1].num_steps == 0 and client.stats()[0].num_steps > 0
        assert [o.outputs[0].token_ids for o in _run(client)] == expected  # both ranks with requests
    finally:
        client.shutdown()
