"""``graphmode::moe_all_to_all`` in a world of one (the engine tests run it over two gloo ranks): the same
output as the reference experts, one opaque node under Dynamo, every collective a DBO yield point."""
import pytest
import torch
import torch.distributed as dist

import runtime.distributed.moe_all_to_all as a2a
from runtime.ops.moe import fused_moe_reference


@pytest.fixture()
def group_name(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield dist.group.WORLD.group_name
    dist.destroy_process_group()


def _inputs(tokens=7, hidden=16, inter=8, experts=4, top_k=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.1
    weights, ids = torch.rand(tokens, experts, generator=g).softmax(-1).topk(top_k, dim=-1)
    return x, w13, w2, weights, ids


def test_matches_the_reference_experts(group_name):
    x, w13, w2, weights, ids = _inputs()
    out = torch.ops.graphmode.moe_all_to_all(x, w13, w2, weights, ids, [0], group_name)
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, weights, ids))


def test_one_opaque_node_under_dynamo(group_name):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, w13, w2, weights, ids = _inputs()
    f = torch.compile(lambda x: torch.ops.graphmode.moe_all_to_all(x, w13, w2, weights[: x.shape[0]],
                                                                  ids[: x.shape[0]], [0], group_name) * 2,
                      backend=backend, fullgraph=True, dynamic=True)
    torch.testing.assert_close(f(x), 2 * fused_moe_reference(x, w13, w2, weights, ids))
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("moe_all_to_all" in t for t in targets) == 1, targets


def test_every_exchange_is_a_yield_point(group_name, monkeypatch):
    labels = []

    def run_collective(label, launch):
        labels.append(label)
        handle = launch()
        if handle is not None:
            handle.wait()

    monkeypatch.setattr(a2a, "run_collective", run_collective)
    x, w13, w2, weights, ids = _inputs()
    torch.ops.graphmode.moe_all_to_all(x, w13, w2, weights, ids, [0], group_name)
    assert labels == ["moe_dispatch"] * 3 + ["moe_combine", "moe_gather"]


def test_chunks_split_the_tokens_evenly():
    assert a2a._chunk(7, 2) == [4, 3] and a2a._chunk(1, 2) == [1, 0] and sum(a2a._chunk(257, 4)) == 257
