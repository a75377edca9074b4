"""CUDA (Hopper+, bf16): ``graphmode::fused_moe`` through the grouped GEMM against an fp32 reference, and
captured in a CUDA graph (it reads no group size on the host)."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
    print(f"skipping {__name__}: needs a CUDA device of compute capability 9.0 or later")
    pytest.skip("needs a CUDA device of compute capability 9.0 or later", allow_module_level=True)

from runtime.ops.moe import fused_moe_grouped, fused_moe_reference  # noqa: E402

# (tokens, hidden, moe intermediate, experts, top-k): the tiny test model's geometry made aligned, and a
# Qwen3-30B-A3B layer (2048 hidden, 768 intermediate, 128 experts, top-8) at decode and prefill sizes.
SHAPES = [(5, 64, 32, 8, 2), (1, 2048, 768, 128, 8), (64, 2048, 768, 128, 8), (512, 2048, 768, 128, 8)]


def _operands(tokens, hidden, inter, experts, top_k):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda", generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=g) * inter ** -0.5
    logits = torch.randn(tokens, experts, device="cuda", generator=g)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grouped_error_vs_fp32_is_no_larger_than_the_references(shape):
    x, w13, w2, weights, ids = _operands(*shape)
    exact = fused_moe_reference(x, w13, w2, weights, ids)
    bf16 = [t.bfloat16() for t in (x, w13, w2, weights)]
    grouped_err = (fused_moe_grouped(*bf16, ids).float() - exact).abs().max().item()
    reference_err = (fused_moe_reference(*bf16, ids).float() - exact).abs().max().item()
    assert grouped_err <= 1.25 * reference_err + 1e-3, (grouped_err, reference_err)


def test_the_op_captures_and_replays():
    x, w13, w2, weights, ids = (t.bfloat16() if t.is_floating_point() else t for t in _operands(64, 2048, 768, 128, 8))
    expected = torch.ops.graphmode.fused_moe(x, w13, w2, weights, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.graphmode.fused_moe(x, w13, w2, weights, ids)
    graph.replay()
    torch.testing.assert_close(out, expected)
    ids.copy_(torch.roll(ids, 1, dims=0))  # new routing, same shapes: the graph follows it
    graph.replay()
    torch.testing.assert_close(out, torch.ops.graphmode.fused_moe(x, w13, w2, weights, ids))
