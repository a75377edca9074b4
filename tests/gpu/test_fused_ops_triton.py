"""Triton kernels of the fused ops (runtime/ops/triton_*.py) against their torch references.

Runs on CUDA by default. With TRITON_INTERPRET=1 it runs on CPU through the Triton interpreter
(small shapes, no bf16: the interpreter mis-handles it); GRAPHMODE_TEST_DEVICE overrides the device.
"""
from __future__ import annotations


import pytest
import torch

from tests.gpu import triton_device  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = triton_device.select(__name__)
INTERPRET = triton_device.INTERPRET

from runtime.ops import triton_activation, triton_rms_norm, triton_rotary  # noqa: E402
from runtime.ops.activation import silu_and_mul_reference  # noqa: E402
from runtime.ops.qk_norm_rotary import qk_norm_rotary_reference  # noqa: E402
from runtime.ops.reduction_order import row_sum_layout  # noqa: E402
from runtime.ops.rms_norm import rms_norm_reference  # noqa: E402
from runtime.ops.rotary import rotary_embedding_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16] if INTERPRET else [torch.bfloat16, torch.float16, torch.float32]
HIDDEN = [64, 576, 1000] if INTERPRET else [64, 100, 576, 1000, 2048, 4096, 8192]
TOKENS = [1, 3, 17] if INTERPRET else [1, 7, 256, 4096]
INTERMEDIATE = [48, 1536] if INTERPRET else [1536, 8192, 14336]
# (q heads, kv heads, head_dim): SmolLM2, Llama-3.2-1B, Qwen3-8B-like; the tiny test Qwen3 / Qwen3-MoE
HEADS = ([(9, 3, 64), (4, 2, 128), (4, 2, 16)] if INTERPRET else
         [(9, 3, 64), (32, 8, 64), (32, 8, 128), (4, 2, 32), (4, 2, 16)])


def _tol(dtype: torch.dtype) -> dict:
    # For kernels that round where torch rounds but do not follow its summation order.
    return {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=4e-3, rtol=4e-3),
            torch.float32: dict(atol=1e-5, rtol=1e-5)}[dtype]


def _randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _sum_in_torch_cuda_order(x: torch.Tensor) -> torch.Tensor:
    """x.sum(-1) of a contiguous fp32 [rows, width] tensor added up the way reduction_order.py says
    torch's CUDA reduction does (plain torch on [rows, lanes] slices: each add is one IEEE add)."""
    rows, width = x.shape
    layout = row_sum_layout(rows, width)
    lanes, vec = layout.lanes, layout.vec
    acc = torch.zeros(4, rows, lanes, dtype=torch.float32, device=x.device)
    padded = torch.zeros(rows, layout.steps(width) * lanes * vec + 3 * lanes, dtype=torch.float32, device=x.device)
    padded[:, :width] = x
    for step in range(layout.steps(width)):
        if vec == 4:
            chunk = padded[:, step * lanes * 4:(step + 1) * lanes * 4].view(rows, lanes, 4)
            for i in range(4):
                acc[i] = acc[i] + chunk[:, :, i]
        else:
            acc[step % 4] = acc[step % 4] + padded[:, step * lanes:(step + 1) * lanes]
    lane = ((acc[0] + acc[1]) + acc[2]) + acc[3]
    while lane.shape[1] > 1:
        half = lane.shape[1] // 2
        lane = lane[:, :half] + lane[:, half:]
    return lane[:, 0]


def _rms_norm_in_torch_cuda_order(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_reference with the mean taken in torch's CUDA order, for the interpreter on CPU."""
    h = x.float()
    inv_n = torch.tensor(1.0, dtype=torch.float32).div(x.shape[-1]).item()
    mean_sq = _sum_in_torch_cuda_order(h * h) * inv_n
    return weight * (h * torch.rsqrt(mean_sq + eps)[:, None]).to(x.dtype)


def _norm_reference(x, weight, eps):
    """What the kernel must equal (bit for bit where reduction_order.py models torch's order): torch
    itself on CUDA; on the interpreter (CPU, whose own reduction order differs) torch's CUDA order
    emulated where it is modelled."""
    if INTERPRET and row_sum_layout(x.shape[0], x.shape[-1]) is not None:
        return _rms_norm_in_torch_cuda_order(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def _exact_or_tol(tokens: int, hidden: int, dtype: torch.dtype) -> dict:
    """Bit-identical where the kernel follows torch's summation order; else the dtype's tolerance."""
    return dict(atol=0, rtol=0) if row_sum_layout(tokens, hidden) else _tol(dtype)


@pytest.mark.parametrize("hidden", HIDDEN + [16, 20, 32, 72, 96, 127])
@pytest.mark.parametrize("tokens", TOKENS + [2, 8, 16, 28, 144])
def test_mean_order_model_matches_torch(tokens, hidden):
    """reduction_order.py's account of torch's row sum, checked against torch's own mean."""
    if INTERPRET:
        pytest.skip("checks torch's CUDA reduction; the interpreter runs on CPU")
    if row_sum_layout(tokens, hidden) is None:
        pytest.skip(f"({tokens}, {hidden}): torch splits the row across warps; not modelled")
    x = _randn(tokens, hidden, dtype=torch.float32) ** 2
    inv_n = torch.tensor(1.0, dtype=torch.float32).div(hidden).item()
    torch.testing.assert_close(_sum_in_torch_cuda_order(x) * inv_n, x.mean(-1), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm(tokens, hidden, dtype):
    x, weight = _randn(tokens, hidden, dtype=dtype), _randn(hidden, dtype=dtype, seed=1)
    out = triton_rms_norm.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, _norm_reference(x, weight, 1e-6), **_exact_or_tol(tokens, hidden, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_fused_add_rms_norm(tokens, hidden, dtype):
    x, residual = _randn(tokens, hidden, dtype=dtype), _randn(tokens, hidden, dtype=dtype, seed=2)
    weight = _randn(hidden, dtype=dtype, seed=1)
    out, new_residual = triton_rms_norm.fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_residual = (x + residual).contiguous()
    # The residual stream is one rounded add: it must be exact.
    torch.testing.assert_close(new_residual, ref_residual, atol=0, rtol=0)
    torch.testing.assert_close(out, _norm_reference(ref_residual, weight, 1e-5),
                               **_exact_or_tol(tokens, hidden, dtype))


def test_rms_norm_strided_rows():
    base = _randn(5, 3 * 576, dtype=torch.float16)
    x = base[:, 576:2 * 576]  # a column slice, as split() of a fused projection gives
    weight = _randn(576, dtype=torch.float16, seed=1)
    torch.testing.assert_close(triton_rms_norm.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6),
                               **_tol(torch.float16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", INTERMEDIATE)
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul(tokens, intermediate, dtype):
    gate_up = _randn(tokens, 2 * intermediate, dtype=dtype)
    out = triton_activation.silu_and_mul(gate_up)
    # Same expf, same IEEE division, same roundings as F.silu on CUDA: bit-identical there (the
    # interpreter's exp is numpy's, not CUDA's).
    exact = dict(atol=0, rtol=0) if not INTERPRET else _tol(dtype)
    torch.testing.assert_close(out, silu_and_mul_reference(gate_up), **exact)


def _qkv(tokens: int, heads: tuple[int, int, int], dtype: torch.dtype):
    num_heads, num_kv_heads, head_dim = heads
    qkv = _randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    table = _randn(4096, head_dim, dtype=torch.float32, seed=3)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    return positions, q, k, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_embedding(is_neox, tokens, heads, dtype):
    positions, q, k, table = _qkv(tokens, heads, dtype)  # q, k: strided column slices of qkv
    head_dim = heads[2]
    q_out, k_out = triton_rotary.rotary_embedding(positions, q, k, table, head_dim, is_neox)
    q_ref, k_ref = rotary_embedding_reference(positions, q, k, table, head_dim, is_neox)
    assert q_out.shape == q.shape and q_out.is_contiguous()
    # Each product rounded like torch's, no FMA contraction: bit-identical.
    torch.testing.assert_close(q_out, q_ref, atol=0, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("is_neox", [True, False])
def test_qk_norm_rotary(is_neox, tokens, heads, dtype):
    positions, q, k, table = _qkv(tokens, heads, dtype)
    num_heads, num_kv_heads, head_dim = heads
    q, k = q.reshape(tokens, num_heads, head_dim), k.reshape(tokens, num_kv_heads, head_dim)
    q_weight, k_weight = _randn(head_dim, dtype=dtype, seed=5), _randn(head_dim, dtype=dtype, seed=6)
    args = (positions, q, k, q_weight, k_weight, 1e-6, table, head_dim, is_neox)
    q_out, k_out = triton_rotary.qk_norm_rotary(*args)
    rows = (tokens * num_heads, tokens * num_kv_heads)
    if not all(triton_rotary.norm_sum_layout(n, head_dim) for n in rows):
        # The kernel sums the squares in its own order there (triton_rotary.py): tolerance.
        q_ref, k_ref = qk_norm_rotary_reference(*args)
        torch.testing.assert_close(q_out, q_ref, **_tol(dtype))
        torch.testing.assert_close(k_out, k_ref, **_tol(dtype))
        return
    if INTERPRET:  # torch's CUDA order emulated on CPU, then the (exact) rotary reference
        q_normed = _norm_reference(q.reshape(-1, head_dim), q_weight, 1e-6).view(q.shape)
        k_normed = _norm_reference(k.reshape(-1, head_dim), k_weight, 1e-6).view(k.shape)
        q_ref, k_ref = rotary_embedding_reference(positions, q_normed, k_normed, table, head_dim, is_neox)
    else:
        q_ref, k_ref = qk_norm_rotary_reference(*args)
    torch.testing.assert_close(q_out, q_ref, atol=0, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=0, rtol=0)


def test_ops_dispatch_to_triton(monkeypatch):
    """The custom ops pick the Triton kernels when op_kernels says so (and the tensors are there)."""
    from runtime.ops.kernels import KERNELS_ENV, use_triton

    monkeypatch.setenv(KERNELS_ENV, "triton")
    dtype = DTYPES[0]
    x, weight = _randn(3, 64, dtype=dtype), _randn(64, dtype=dtype, seed=1)
    assert use_triton("graphmode::rms_norm", x, weight)
    calls = []
    original = triton_rms_norm.rms_norm
    monkeypatch.setattr(triton_rms_norm, "rms_norm", lambda *a: calls.append(1) or original(*a))
    out = torch.ops.graphmode.rms_norm(x, weight, 1e-6)
    assert calls, "graphmode::rms_norm did not use the Triton kernel"
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-6), **_tol(dtype))


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_fused_model_graph_matches_eager(arch, monkeypatch):
    """A tiny model traced with make_fx, fused by the default passes, run with the Triton kernels."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from models.loader import build_model
    from models.testing import tiny_config
    from passes.manager import PassManager
    from runtime.attention.kv_tensors import allocate_kv_caches
    from runtime.attention.metadata import AttentionMetadata
    from runtime.forward_context import set_forward_context
    from runtime.ops.kernels import KERNELS_ENV

    monkeypatch.setenv(KERNELS_ENV, "triton")
    dtype = DTYPES[0]
    torch.manual_seed(0)
    model = build_model(tiny_config(arch), dtype, DEVICE, init=True).requires_grad_(False)
    query_lens = [5, 3]
    ids = torch.randint(0, 256, (sum(query_lens),), device=DEVICE)
    positions = torch.cat([torch.arange(n) for n in query_lens]).to(DEVICE)

    def context():
        md = AttentionMetadata.build(query_lens, query_lens, [[1], [2]], 16, device=DEVICE)
        return set_forward_context(md, allocate_kv_caches(model, 3, 16, dtype, DEVICE))

    gm = make_fx(lambda i, p: model(i, p), tracing_mode="symbolic", _allow_non_fake_inputs=True)(ids, positions)
    pm = PassManager.from_names(["default"], verify=True)
    pm(gm)
    assert pm.match_counts["fuse_add_rms_norm"] == 3
    with torch.no_grad(), context():
        ref = model(ids, positions)
    with torch.no_grad(), context():
        out = gm(ids, positions)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
