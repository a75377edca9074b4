"""CUDA: a capture an op refuses (a host read) fails without leaving the device in capture state."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    print(f"skipping {__name__}: CUDA is not available")
    pytest.skip("CUDA is not available", allow_module_level=True)

from compiler.graphs import GraphRuntime, StaticGraphRunner  # noqa: E402
from runtime.platforms import current_platform  # noqa: E402


def test_a_failed_capture_falls_back_and_leaves_the_device_usable():
    runtime = GraphRuntime(current_platform, current_platform.graph_pool_handle())
    x = torch.ones(8, device="cuda")
    syncs = StaticGraphRunner(lambda t: t * float(t.sum().item()), "syncs", frozenset({8}))
    syncs(runtime, 8, (x,))  # warm-up
    out = syncs(runtime, 8, (x,))  # the capture fails: the call runs without a graph
    assert syncs.failed and torch.equal(out, x * 8)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randn(4, device="cuda")  # the RNG generators are out of capture mode
    doubles = StaticGraphRunner(lambda t: t * 2, "doubles", frozenset({8}))
    for _ in range(3):  # warm-up, capture, replay
        assert torch.equal(doubles(runtime, 8, (x,)), x * 2)
    assert not doubles.failed and doubles.entries
