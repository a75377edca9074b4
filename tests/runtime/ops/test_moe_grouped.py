"""``fused_moe_grouped`` (grouped GEMMs over device-side group ends) against the padded reference, and when
``graphmode::fused_moe`` picks it. On CPU ``torch._grouped_mm`` runs its fallback: the same arithmetic."""
import pytest
import torch

import runtime.ops.moe as moe
from runtime.ops.kernels import KERNELS_ENV

T, H, I, E, K = 37, 64, 32, 6, 2


def _operands(dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * 0.1).to(dtype)
    weights = torch.rand(T, K, generator=g).to(dtype)
    ids = torch.randint(0, E - 1, (T, K), generator=g)  # expert E-1 gets no token
    ids[3, 1] = -1  # a pair another rank owns (expert parallelism)
    ids[5] = -1  # a token with no pair here at all
    return [t.to(device) for t in (hidden, w13, w2, weights)] + [ids.to(device)]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_grouped_equals_the_reference(dtype, atol):
    args = _operands(dtype)
    out = moe.fused_moe_grouped(*args)
    torch.testing.assert_close(out, moe.fused_moe_reference(*args), atol=atol, rtol=atol)
    assert out[5].abs().max() == 0  # nothing of a token whose pairs are all elsewhere


def test_grouped_has_no_data_dependent_shape():
    # Meta tensors hold no values: an op whose output shape depends on them (nonzero, bincount, .item()) fails
    # here, and would sync with the host on a device and break a graph capture.
    out = moe.fused_moe_grouped(*_operands(torch.bfloat16, "meta"))
    assert out.shape == (T, H) and out.device.type == "meta"


def test_the_op_takes_the_grouped_path_where_the_platform_has_it(monkeypatch):
    calls = []
    monkeypatch.setattr(moe.current_platform, "has_grouped_gemm", lambda dtype: dtype == torch.bfloat16)
    monkeypatch.setattr(moe, "fused_moe_grouped", lambda *a: calls.append("grouped") or moe.fused_moe_reference(*a))
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    torch.ops.graphmode.fused_moe(*_operands(torch.bfloat16))
    assert calls == ["grouped"]
    torch.ops.graphmode.fused_moe(*_operands(torch.float32))  # the platform has no grouped GEMM for fp32
    unaligned = _operands(torch.bfloat16)
    unaligned[1] = unaligned[1][:, :-2]  # 2I = 62 columns: rows not 16-byte aligned
    unaligned[2] = unaligned[2][:, :, :31]
    torch.ops.graphmode.fused_moe(*unaligned)
    monkeypatch.setenv(KERNELS_ENV, "fused_moe=torch")  # the reference, asked for by name
    torch.ops.graphmode.fused_moe(*_operands(torch.bfloat16))
    assert calls == ["grouped"]
