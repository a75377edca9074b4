"""Platform conformance: one suite, parametrised over cpu, cuda and npu, that every platform passes.

A platform the machine cannot run is skipped with the reason printed (cuda without a GPU, npu
without torch_npu). Op kernels and the attention backend are chosen through the process's current
platform, so those checks run for the current platform only. Also here: platform selection never
imports torch_npu on a machine without it, and forcing npu there is a clear error.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import runtime.attention.op  # noqa: F401  (registers graphmode::attention)
import runtime.ops.activation  # noqa: F401  (each module registers its custom op)
import runtime.ops.moe  # noqa: F401
import runtime.ops.norm_linear  # noqa: F401
import runtime.ops.qk_norm_rotary  # noqa: F401
from runtime.attention.metadata import AttentionMetadata
from runtime.attention.op import attention_backend
from runtime.platforms import (CpuPlatform, CudaPlatform, Platform, PlatformUnavailable, current_platform,
                               npu_installed, select_platform)
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT


def _skip(name: str, reason: str) -> None:
    print(f"skipping the {name} platform: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module", params=["cpu", "cuda", "npu", "out-of-tree"])
def platform(request) -> Platform:
    name = request.param
    if name == current_platform.name:
        return current_platform
    if name == "out-of-tree":  # a GRAPHMODE_PLATFORM=package.module:Class platform
        if current_platform.name in ("cpu", "cuda", "npu"):
            pytest.skip(f"the current platform is the built-in {current_platform.name}")
        return current_platform
    if name == "cpu":
        return CpuPlatform()
    if name == "cuda":
        if not CudaPlatform.is_available():
            _skip(name, "CUDA is not available on this machine")
        return CudaPlatform()
    if not npu_installed():
        _skip(name, "torch_npu is not installed (pip install 'graphmode[npu]' on an Ascend host)")
    platform = select_platform("npu")
    if not platform.is_available():
        _skip(name, "torch_npu sees no NPU device")
    return platform


@pytest.fixture
def current(platform) -> Platform:
    if platform is not current_platform:
        pytest.skip(f"op kernels and attention dispatch through the current platform ({current_platform.name})")
    return platform


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


# ---- device, memory, streams, graphs ---------------------------------------------------------
def test_device_and_device_count(platform):
    device = platform.device()
    assert device.type == platform.device_type
    assert torch.ones(2, device=device).sum().item() == 2
    assert platform.device_count() >= 1
    platform.set_device(0)
    assert isinstance(platform.device_name(), str) and platform.device_name()
    assert platform.dist_backend in ("gloo", "nccl", "hccl")


def test_memory_info(platform):
    info = platform.memory_info()
    assert info.total_bytes > 0 and 0 <= info.free_bytes <= info.total_bytes
    platform.reset_peak_memory()
    before = platform.memory_allocated()
    keep = torch.empty(1 << 20, dtype=torch.uint8, device=platform.device())
    platform.synchronize()
    assert platform.memory_allocated() >= before >= 0
    assert platform.peak_memory_bytes() >= (keep.numel() if platform.supports_memory_profiling else 0)
    platform.empty_cache()


def test_streams_and_events(platform):
    x = torch.arange(8, dtype=torch.float32, device=platform.device())
    if not platform.supports_streams:
        assert platform.new_stream() is None and platform.new_event() is None
        with platform.stream_context(None):
            assert torch.equal(x * 2, x + x)
        return
    side, done = platform.new_stream(), platform.new_event()
    side.wait_stream(platform.current_stream())
    with platform.stream_context(side):
        assert platform.current_stream() == side
        y = x * 2
        done.record(side)
    platform.current_stream().wait_event(done)
    z = y + 1  # ordered after the side stream's work by the event
    platform.synchronize()
    assert torch.equal(z.cpu(), torch.arange(8, dtype=torch.float32) * 2 + 1)


def test_static_graph_capture_and_replay(platform):
    if not platform.supports_static_graphs:
        _skip(platform.name, "no static graphs on this platform (graph modes degrade to compiled pieces)")
    device = platform.device()
    x = torch.zeros(16, device=device)
    warm = platform.new_stream()  # warm-up off the capture stream, as the capture APIs ask
    warm.wait_stream(platform.current_stream())
    with platform.stream_context(warm):
        x * 2 + 1
    platform.current_stream().wait_stream(warm)
    pool = platform.graph_pool_handle()
    first, second = platform.new_graph(), platform.new_graph()
    with platform.graph_capture(first, pool):
        y = x * 2 + 1
    with platform.graph_capture(second, pool):  # a second graph in the same pool reads the first's output
        z = y.sum()
    for step in range(3):
        x.copy_(torch.full((16,), float(step), device=device))
        first.replay()
        second.replay()
        platform.synchronize()
        assert torch.equal(y.cpu(), torch.full((16,), 2.0 * step + 1)) and z.item() == 16 * (2 * step + 1)


# ---- op kernels agree with the torch reference -----------------------------------------------
def _op_cases(device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    tokens, heads, kv_heads, dim = 5, 4, 2, 64
    positions = torch.tensor([0, 3, 7, 1, 30], device=device)
    angles = torch.arange(32, dtype=torch.float32)[:, None] * torch.rand(dim // 2, generator=g)[None]
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)
    q, k = randn(tokens, heads * dim), randn(tokens, kv_heads * dim)
    qh, kh = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    experts, top_k = 4, 2
    topk_ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]], device=device, dtype=torch.int32)
    return {
        "graphmode::rms_norm": ("rms_norm_reference", (randn(tokens, 96), randn(96), 1e-6)),
        "graphmode::fused_add_rms_norm": ("fused_add_rms_norm_reference", (randn(tokens, 96), randn(tokens, 96),
                                                                           randn(96), 1e-6)),
        "graphmode::silu_and_mul": ("silu_and_mul_reference", (randn(tokens, 2 * 48),)),
        "graphmode::rotary_embedding": ("rotary_embedding_reference", (positions, q, k, cache, dim, True)),
        "graphmode::rotary_embedding(gptj)": ("rotary_embedding_reference", (positions, q, k, cache, dim, False)),
        "graphmode::qk_norm_rotary": ("qk_norm_rotary_reference", (positions, qh, kh, randn(dim), randn(dim), 1e-6,
                                                                   cache, dim, True)),
        "graphmode::rms_norm_linear": ("rms_norm_linear_reference", (randn(tokens, 96), randn(96), 1e-6,
                                                                     randn(64, 96) * 0.1, None, False)),
        "graphmode::add_rms_norm_linear(gated)": ("add_rms_norm_linear_reference", (
            randn(tokens, 96), randn(tokens, 96), randn(96), 1e-6, randn(2 * 48, 96) * 0.1, randn(2 * 48), True)),
        "graphmode::fused_moe": ("fused_moe_reference", (randn(tokens, 32), randn(experts, 2 * 16, 32) * 0.1,
                                                         randn(experts, 32, 16) * 0.1,
                                                         torch.rand(tokens, top_k, generator=g).to(device), topk_ids)),
    }


def _custom_ops_in_runtime_ops() -> set[str]:
    """Every ``graphmode::`` op a runtime/ops module registers (the modules name them in *_OP constants)."""
    import importlib
    import pkgutil

    import runtime.ops

    names = set()
    for info in pkgutil.iter_modules(runtime.ops.__path__):
        if info.name.startswith("triton_"):  # kernels, not ops (and they need triton)
            continue
        module = importlib.import_module(f"runtime.ops.{info.name}")
        names |= {v for k, v in vars(module).items() if k.endswith("_OP") and str(v).startswith("graphmode::")}
    return names


def test_every_custom_op_has_a_conformance_case():
    covered = {name.split("(")[0] for name in _op_cases(torch.device("cpu"), torch.float32)}
    assert _custom_ops_in_runtime_ops() == covered


@pytest.mark.parametrize("case", sorted(_op_cases(torch.device("cpu"), torch.float32)))
def test_op_kernel_agrees_with_reference(current, case):
    import importlib

    dtype = current.auto_dtype(None)
    reference_name, args = _op_cases(current.device(), dtype)[case]
    op_name = case.split("(")[0]
    module = next(m for m in list(sys.modules.values())
                  if getattr(m, "__name__", "").startswith("runtime.ops.") and hasattr(m, reference_name))
    reference = getattr(importlib.import_module(module.__name__), reference_name)
    namespace, name = op_name.split("::")
    got = getattr(getattr(torch.ops, namespace), name)(*args)
    want = reference(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), **_tol(dtype))


# ---- the attention backend agrees with dense attention ---------------------------------------
def _dense_attention(q, k, v, q_positions, scale):
    """One request: q [Q, H, D], k/v [L, KVH, D] (its whole history), causal by position; fp32."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q.float(), k) * scale
    mask = torch.arange(k.shape[0])[None, :] <= torch.tensor(q_positions)[:, None]
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("batch", ["mixed", "decode"])
def test_attention_backend_agrees_with_dense_attention(current, batch):
    device, dtype = current.device(), current.auto_dtype(None)
    heads, kv_heads, dim = 4, 2, 64
    block_size = 128 if current.name == "npu" else 16  # the fused attention op pages in 128-token blocks
    history, query_lens = ([0, 20, 5, 33], [7, 1, 6, 1]) if batch == "mixed" else ([9, 20, 40], [1, 1, 1])
    seq_lens = [h + q for h, q in zip(history, query_lens)]
    g = torch.Generator().manual_seed(1)
    blocks = torch.randperm(32, generator=g).tolist()  # scattered, non-contiguous block tables
    tables = [[blocks.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    num_blocks = 32
    kv_cache = torch.zeros(2, num_blocks, block_size, kv_heads, dim, dtype=dtype, device=device)
    full_k = [torch.randn(s, kv_heads, dim, generator=g).to(device, dtype) for s in seq_lens]
    full_v = [torch.randn(s, kv_heads, dim, generator=g).to(device, dtype) for s in seq_lens]
    backend = attention_backend()
    past = AttentionMetadata.build(history, history, tables, block_size, device)
    backend.store_kv(torch.cat([k[:h] for k, h in zip(full_k, history)]),
                     torch.cat([v[:h] for v, h in zip(full_v, history)]), kv_cache, past.slot_mapping)
    num_tokens = sum(query_lens)
    md = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device, num_padded_tokens=num_tokens + 3)
    query = torch.randn(num_tokens + 3, heads, dim, generator=g).to(device, dtype)
    new_k = torch.cat([k[h:] for k, h in zip(full_k, history)] + [torch.zeros(3, kv_heads, dim).to(device, dtype)])
    new_v = torch.cat([v[h:] for v, h in zip(full_v, history)] + [torch.zeros(3, kv_heads, dim).to(device, dtype)])
    out = torch.full_like(query, float("nan"))
    scale = 1 / math.sqrt(dim)
    backend.store_kv(new_k, new_v, kv_cache, md.slot_mapping)
    backend.paged_attention(query, kv_cache, md, scale, None, out)
    current.synchronize()
    start = 0
    for k, v, h, q_len in zip(full_k, full_v, history, query_lens):
        want = _dense_attention(query[start:start + q_len].cpu(), k.cpu(), v.cpu(), list(range(h, h + q_len)), scale)
        torch.testing.assert_close(out[start:start + q_len].float().cpu(), want, **_tol(dtype))
        start += q_len
    assert torch.equal(out[num_tokens:].float().cpu(), torch.zeros(3, heads, dim))  # padded rows: zeros


# ---- selection: torch_npu is never touched where it is not installed ---------------------------
_IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
failed = []
for package in ("compiler", "passes", "runtime", "models"):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if info.name.startswith("runtime.platforms.npu"):  # the NPU platform's own modules import torch_npu
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:  # an optional dependency of that module (triton, ...)
            failed.append([info.name, e.name])
from runtime.platforms import current_platform
print(json.dumps({"npu_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch_npu", "torchair")),
                  "platform": current_platform.name, "failed": failed}))
"""


def test_importing_the_project_never_imports_torch_npu():
    if npu_installed():
        pytest.skip("torch_npu is installed here: the NPU platform is meant to load it")
    env = {k: v for k, v in os.environ.items() if k != "GRAPHMODE_PLATFORM"}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["npu_modules"] == []
    assert report["platform"] in ("cpu", "cuda")
    # Only optional third-party packages may be missing, never a module of ours.
    assert all(missing.split(".")[0] not in ("compiler", "passes", "runtime", "models")
               for _, missing in report["failed"]), report["failed"]


def test_npu_is_never_selected_without_torch_npu(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch_npu" else real_find_spec(name, *args))
    assert not npu_installed()
    assert select_platform("").name in ("cpu", "cuda")
    with pytest.raises(PlatformUnavailable, match="torch_npu is not installed"):
        select_platform("npu")


def test_unknown_platform_names_are_clear_errors():
    with pytest.raises(ValueError, match="not a known platform"):
        select_platform("tpu")
    with pytest.raises(PlatformUnavailable, match="cannot load the platform class"):
        select_platform("no_such_module:Platform")
    with pytest.raises(PlatformUnavailable, match="not a subclass"):
        select_platform("torch:Tensor")


# ---- NPU kernels: our argument mapping against torch_npu's documented formulas -----------------
def _documented_torch_npu():
    """A stand-in ``torch_npu`` computing what its documentation specifies for the kernels we call
    (shape constraints included), so the mapping of our ops' arguments onto them is checked here."""
    import types

    import torch.nn.functional as F

    def npu_rms_norm(x, gamma, epsilon=1e-6):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
        return (x.float() * rstd * gamma.float()).to(x.dtype), rstd

    def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
        x = x1 + x2
        y, rstd = npu_rms_norm(x, gamma, epsilon)
        return y, rstd, x

    def npu_swiglu(x, dim=-1):
        a, b = x.chunk(2, dim=dim)
        return F.silu(a) * b

    def npu_rotary_mul(x, r1, r2, rotary_mode="half"):
        assert x.dim() == 4 and r1.shape == r2.shape == (x.shape[0], x.shape[1], 1, x.shape[3]), "BSND with BS1D"
        if rotary_mode == "half":
            x1, x2 = x.chunk(2, dim=-1)
            rotated = torch.cat([-x2, x1], dim=-1)
        else:
            rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
        return r1 * x + r2 * rotated

    return types.SimpleNamespace(npu_rms_norm=npu_rms_norm, npu_add_rms_norm=npu_add_rms_norm,
                                 npu_swiglu=npu_swiglu, npu_rotary_mul=npu_rotary_mul)


# Ops the NPU serves with its own kernels; the rest (fused_moe, the norm + linear ops) run their generic path there,
# which calls the mapped ops.
NPU_MAPPED = ("graphmode::rms_norm", "graphmode::fused_add_rms_norm", "graphmode::silu_and_mul",
              "graphmode::rotary_embedding", "graphmode::qk_norm_rotary")


@pytest.mark.parametrize("case", sorted(c for c in _op_cases(torch.device("cpu"), torch.float32)
                                        if c.split("(")[0] in NPU_MAPPED))
def test_npu_kernels_map_our_ops_onto_documented_torch_npu_semantics(monkeypatch, case):
    import importlib

    if npu_installed():
        pytest.skip("torch_npu is installed: the conformance cases above run its real kernels")
    monkeypatch.setitem(sys.modules, "torch_npu", _documented_torch_npu())
    monkeypatch.delitem(sys.modules, "runtime.platforms.npu_kernels", raising=False)
    try:
        kernels = importlib.import_module("runtime.platforms.npu_kernels").KERNELS
    finally:
        sys.modules.pop("runtime.platforms.npu_kernels", None)  # never leave the stand-in bound
    assert set(kernels) == set(NPU_MAPPED)
    reference_name, args = _op_cases(torch.device("cpu"), torch.float32)[case]
    module = next(m for m in list(sys.modules.values())
                  if getattr(m, "__name__", "").startswith("runtime.ops.") and hasattr(m, reference_name))
    got, want = kernels[case.split("(")[0]](*args), getattr(module, reference_name)(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
