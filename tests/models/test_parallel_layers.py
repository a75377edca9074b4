"""Tensor-parallel sharding without processes: head layouts, load-time cuts, the collective op in graphs."""
import pytest
import torch
import torch.distributed as dist

from compiler.split import split_graph
from models.loader import load_model
from models.parallel_layers import check_shardable, even_shard, head_shards
from models.testing import tiny_config, write_tiny_checkpoint
from runtime.contracts.config import EngineConfig
from runtime.distributed.collectives import reduce_across
from runtime.distributed.parallel_state import ParallelConfig, ParallelContext


def _layout(heads, kv_heads, world):
    shards = [head_shards(heads, kv_heads, ParallelContext(r, world)) for r in range(world)]
    return [(s.q.start, s.q.count) for s in shards], [(s.kv.start, s.kv.count) for s in shards]


def test_head_shards_cut_whole_kv_groups_even_when_uneven():
    # SmolLM2: 9 query heads in 3 KV groups of 3; two ranks take 2 and 1 groups.
    assert _layout(9, 3, 2) == ([(0, 6), (6, 3)], [(0, 2), (2, 1)])
    assert _layout(9, 3, 3) == ([(0, 3), (3, 3), (6, 3)], [(0, 1), (1, 1), (2, 1)])
    # Fewer KV heads than ranks: each KV head replicated, its group's query heads split.
    assert _layout(8, 2, 4) == ([(0, 2), (2, 2), (4, 2), (6, 2)], [(0, 1), (0, 1), (1, 1), (1, 1)])
    assert even_shard(49152, 1, 2).start == 24576 and even_shard(7, 2, 3).count == 2


def test_unshardable_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="tensor_parallel_size=4 cannot shard attention with 9 query heads and 3 KV"):
        head_shards(9, 3, ParallelContext(0, 4))
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        check_shardable(tiny_config("LlamaForCausalLM"), ParallelConfig(2, enable_expert_parallel=True))
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="enable_expert_parallel needs tensor_parallel_size >= 2"):
        EngineConfig(enable_expert_parallel=True)
    with pytest.raises(ValueError, match="expert_parallel_comm must be one of all_reduce, all_to_all, got 'nccl'"):
        EngineConfig(tensor_parallel_size=2, enable_expert_parallel=True, expert_parallel_comm="nccl")
    with pytest.raises(ValueError, match="expert_parallel_comm='all_to_all' needs enable_expert_parallel=True"):
        EngineConfig(tensor_parallel_size=2, expert_parallel_comm="all_to_all")
    with pytest.raises(ValueError, match="pass a checkpoint path"):
        from runtime.engine.core import EngineCore
        EngineCore(EngineConfig(tensor_parallel_size=2), loaded=object())


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    # Uneven everywhere: 5 experts, vocab 255, moe intermediate 33, 6 query / 3 KV heads over 2 ranks.
    return write_tiny_checkpoint("Qwen3MoeForCausalLM", str(tmp_path_factory.mktemp("moe")), num_experts=5,
                                 vocab_size=255, moe_intermediate_size=33, num_attention_heads=6,
                                 num_key_value_heads=3, intermediate_size=99)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "ep"])
def test_load_cuts_every_tensor_to_this_ranks_shard(moe_path, expert_parallel):
    full = dict(load_model(moe_path, dtype="float32", device="cpu").model.named_parameters())
    ranks = [dict(load_model(moe_path, dtype="float32", device="cpu",
                             parallel=ParallelContext(r, 2, "unused", expert_parallel)).model.named_parameters())
             for r in range(2)]
    attn, moe, mlp = "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.mlp"
    qkv = [full[f"{attn}.qkv_proj.weight"].split([6 * 16, 3 * 16, 3 * 16])]  # head_dim 16
    q, k, v = qkv[0]
    # rank 0: KV heads 0-1 and their query heads 0-3; rank 1: KV head 2, query heads 4-5.
    assert torch.equal(ranks[0][f"{attn}.qkv_proj.weight"], torch.cat([q[:64], k[:32], v[:32]]))
    assert torch.equal(ranks[1][f"{attn}.qkv_proj.weight"], torch.cat([q[64:], k[32:], v[32:]]))
    assert torch.equal(torch.cat([r[f"{attn}.o_proj.weight"] for r in ranks], dim=1), full[f"{attn}.o_proj.weight"])
    gate, up = full[f"{mlp}.gate_up_proj.weight"].chunk(2)
    assert torch.equal(ranks[1][f"{mlp}.gate_up_proj.weight"], torch.cat([gate[50:], up[50:]]))
    embed = "model.embed_tokens.weight"
    assert torch.equal(torch.cat([r[embed] for r in ranks]), full[embed])
    w13, w2 = full[f"{moe}.w13"], full[f"{moe}.w2"]
    if expert_parallel:  # whole experts: 3 on rank 0, 2 on rank 1
        assert torch.equal(ranks[1][f"{moe}.w13"], w13[3:]) and torch.equal(ranks[0][f"{moe}.w2"], w2[:3])
    else:  # every expert, intermediate rows 0-16 / 17-32 of both gate and up
        assert torch.equal(ranks[1][f"{moe}.w13"], torch.cat([w13[:, 17:33], w13[:, 50:66]], dim=1))
        assert torch.equal(ranks[1][f"{moe}.w2"], w2[:, :, 17:])


@pytest.fixture()
def one_rank_group(tmp_path):
    """A world of one: the collective runs for real (a no-op sum) and graphs can be traced."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield ParallelContext(0, 2, dist.group.WORLD.group_name)  # world_size 2: take the collective path
    dist.destroy_process_group()


def test_all_reduce_is_one_traceable_splittable_op(one_rank_group):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x):
        return reduce_across(x * 2, one_rank_group) + 1

    x = torch.randn(5, 8)
    compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), x * 2 + 1)
    _, pieces = split_graph(graphs[0], ["graphmode::all_reduce"])
    assert [p.is_splitting_op for p in pieces] == [False, True, False]
    assert "graphmode::all_reduce" in pieces[1].op_counts()
