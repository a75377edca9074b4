"""The fused RMSNorm -> linear (-> SiLU-and-mul) kernel against fp32, beside the unfused ops it replaces.

The kernel sums in its own order, so it is not bit-identical to cuBLAS. What it must be: as close to an
fp32 computation of the same layer as the unfused ops are (issue 24: a new kernel's error no larger
than the op it replaces). The residual sum it writes is one rounded add and must be exact.

Runs on CUDA by default; with TRITON_INTERPRET=1 on CPU through the Triton interpreter (small shapes,
no bf16: the interpreter mis-handles it).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.gpu import triton_device  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = triton_device.select(__name__)
INTERPRET = triton_device.INTERPRET

from runtime.ops import triton_norm_linear  # noqa: E402
from runtime.ops.norm_linear import add_rms_norm_linear_reference, rms_norm_linear_reference  # noqa: E402

DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
TOKENS = [1, 3, 17] if INTERPRET else [1, 7, 16, 33, 64]
# (hidden, projection rows): SmolLM2's q/k/v and gate/up; Llama-3.2-1B's (GPU only); ragged sizes.
SHAPES = ([(64, 96), (576, 960), (100, 72)] if INTERPRET else
          [(576, 960), (576, 3072), (2048, 3072), (2048, 16384), (100, 72)])
# Mean |error| vs fp32 may exceed the unfused ops' by this factor (both are ~1/4 ulp of the dtype;
# the margin keeps a draw of random data from deciding the test).
ERROR_MARGIN = 1.10


def _randn(*shape: int, dtype: torch.dtype, seed: int, std: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * std).to(device=DEVICE, dtype=dtype)


def _inputs(tokens: int, hidden: int, rows: int, dtype: torch.dtype, bias: bool):
    x, residual = _randn(tokens, hidden, dtype=dtype, seed=0), _randn(tokens, hidden, dtype=dtype, seed=1)
    norm_weight = 1 + _randn(hidden, dtype=dtype, seed=2, std=0.1)
    weight = _randn(rows, hidden, dtype=dtype, seed=3, std=hidden ** -0.5)
    return x, residual, norm_weight, weight, (_randn(rows, dtype=dtype, seed=4, std=0.1) if bias else None)


def _unfused(x, residual, norm_weight, weight, bias, gated, eps):
    """What the graph runs without the pass: the norm, cuBLAS (CPU: torch's mm), the SwiGLU."""
    if residual is None:
        return rms_norm_linear_reference(x, norm_weight, eps, weight, bias, gated), None
    return add_rms_norm_linear_reference(x, residual, norm_weight, eps, weight, bias, gated)


def _fp32(x, residual, norm_weight, weight, bias, gated, eps):
    h = x.float() if residual is None else (x + residual).float()  # the sum is rounded in the model too
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    projected = F.linear(normed.double(), weight.double(), None if bias is None else bias.double())
    if gated:
        gate, up = projected.chunk(2, dim=-1)
        projected = F.silu(gate) * up
    return projected


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_error_no_larger_than_the_unfused_ops(tokens, shape, dtype, with_residual, bias, gated):
    hidden, rows = shape
    x, residual, norm_weight, weight, b = _inputs(tokens, hidden, rows, dtype, bias)
    residual = residual if with_residual else None
    out, summed = triton_norm_linear.norm_linear(x, residual, norm_weight, 1e-6, weight, b, gated)
    ref, ref_summed = _unfused(x, residual, norm_weight, weight, b, gated, 1e-6)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if with_residual:
        torch.testing.assert_close(summed, ref_summed, atol=0, rtol=0)
    else:
        assert summed is None
    exact = _fp32(x, residual, norm_weight, weight, b, gated, 1e-6)
    kernel_error = (out.double() - exact).abs().mean().item()
    unfused_error = (ref.double() - exact).abs().mean().item()
    assert kernel_error <= unfused_error * ERROR_MARGIN, (kernel_error, unfused_error)


@pytest.mark.parametrize("block_n", [16, 32, 64, 128])
def test_every_column_block_width(block_n):
    # The device picks the width from its multiprocessor count (the interpreter: the widest): all must agree.
    # (Not bit for bit: the dot's summation order may depend on the tile's shape.)
    x, residual, norm_weight, weight, b = _inputs(3, 96, 200, torch.float16, bias=True)
    out, _ = triton_norm_linear.norm_linear(x, residual, norm_weight, 1e-6, weight, b, True, block_n=block_n)
    ref, _ = _unfused(x, residual, norm_weight, weight, b, True, 1e-6)
    exact = _fp32(x, residual, norm_weight, weight, b, True, 1e-6)
    assert (out.double() - exact).abs().mean() <= ERROR_MARGIN * (ref.double() - exact).abs().mean()


def test_float32_matches_fp32_reference():
    x, residual, norm_weight, weight, b = _inputs(5, 96, 64, torch.float32, bias=True)
    out, _ = triton_norm_linear.norm_linear(x, residual, norm_weight, 1e-5, weight, b, True)
    ref, _ = _unfused(x, residual, norm_weight, weight, b, True, 1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_no_tokens():
    x, residual, norm_weight, weight, _ = _inputs(1, 64, 32, torch.float16, bias=False)
    out, summed = triton_norm_linear.norm_linear(x[:0], residual[:0], norm_weight, 1e-6, weight, None, False)
    assert out.shape == (0, 32) and summed.shape == (0, 64)
