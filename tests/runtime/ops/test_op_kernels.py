"""GRAPHMODE_OP_KERNELS: one provider for every fused op, or one per op (to trace a numerical
difference to its kernel by swapping one op at a time for its reference)."""
import pytest
import torch

import runtime.ops.rms_norm  # noqa: F401  (registers graphmode::rms_norm)
from runtime.ops import kernels
from runtime.ops.kernels import KERNELS_ENV, kernel_provider, platform_kernel, use_triton


def test_platform_default_without_override(monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert kernel_provider("graphmode::rms_norm") == kernels.current_platform.op_kernels


def test_one_provider_for_every_op(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "triton")
    assert kernel_provider("graphmode::rms_norm") == kernel_provider("graphmode::rotary_embedding") == "triton"


def test_per_op_override_with_or_without_the_qualified_name(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "triton, rotary_embedding=torch, graphmode::silu_and_mul=torch")
    assert kernel_provider("graphmode::rotary_embedding") == "torch"
    assert kernel_provider("graphmode::silu_and_mul") == "torch"
    assert kernel_provider("graphmode::rms_norm") == "triton"
    assert kernel_provider() == "triton"


def test_per_op_override_alone_keeps_the_platform_default_for_the_rest(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "rms_norm=triton")
    assert kernel_provider("graphmode::rms_norm") == "triton"
    assert kernel_provider("graphmode::silu_and_mul") == kernels.current_platform.op_kernels


@pytest.mark.parametrize("value", ["fast", "rms_norm=cublas", "triton,rotary_embedding="])
def test_unknown_provider_is_named(monkeypatch, value):
    monkeypatch.setenv(KERNELS_ENV, value)
    with pytest.raises(ValueError, match=KERNELS_ENV):
        kernel_provider("graphmode::rms_norm")


def test_override_sets_aside_the_platform_kernel_only_for_the_ops_it_names(monkeypatch):
    vendor = object()
    monkeypatch.setattr(kernels.current_platform, "op_kernel", lambda op_name: vendor)
    monkeypatch.setenv(KERNELS_ENV, "rotary_embedding=torch")
    assert platform_kernel("graphmode::rotary_embedding") is None
    assert platform_kernel("graphmode::rms_norm") is vendor
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert platform_kernel("graphmode::rms_norm") is None


def test_torch_override_keeps_triton_out(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "triton,rms_norm=torch")
    x = torch.ones(2, 4)
    assert not use_triton("graphmode::rms_norm", x)
    # The reference serves the op.
    out = torch.ops.graphmode.rms_norm(x, torch.ones(4), 1e-6)
    torch.testing.assert_close(out, torch.ones(2, 4))
