"""Fusion passes on make_fx ATen graphs: match counts, the ops they leave, unchanged outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch._subclasses.fake_tensor import FakeTensorMode

from models.layers import GatedMLP, RMSNorm, RotaryEmbedding
from models.loader import build_model
from models.testing import tiny_config
from passes.base import GraphPass
from passes.manager import OPT_IN_PASSES, PASSES, PassManager, PassVerificationError, default_pass_names
from runtime.attention.kv_tensors import allocate_kv_caches
from runtime.attention.metadata import AttentionMetadata
from runtime.forward_context import set_forward_context

aten, graphmode = torch.ops.aten, torch.ops.graphmode
MODES = ["symbolic", "fake", "dynamic"]
TOL = {torch.float32: dict(atol=0, rtol=0), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def trace(fn, *args, mode: str = "symbolic") -> torch.fx.GraphModule:
    """make_fx as the compiler does. "dynamic": fake inputs with only dim 0 symbolic (Dynamo's view)."""
    if mode != "dynamic":
        return make_fx(fn, tracing_mode=mode, _allow_non_fake_inputs=True)(*args)
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = [fake_mode.from_tensor(a, symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (a.dim() - 1))) for a in args]
    return make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*fakes)


def run_passes(gm: torch.fx.GraphModule, *names: str) -> dict[str, int]:
    pm = PassManager.from_names(list(names), verify=True)
    pm(gm)
    return dict(pm.match_counts)


def targets(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def check_fused(fn, args, mode, names, expected: dict[str, int], gone=(), present=(), rerun_args=None):
    torch.manual_seed(0)
    gm = trace(fn, *args, mode=mode)
    counts = run_passes(gm, *names)
    assert {name: counts[name] for name in expected} == expected
    found = targets(gm)
    assert not found & set(gone), found & set(gone)
    assert set(present) <= found
    # New nodes carry fake values like the rest (later compiler stages read them).
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    for inputs in [args] + ([rerun_args] if rerun_args and mode != "fake" else []):
        ref, out = fn(*inputs), gm(*inputs)
        for r, o in zip(pytree_leaves(ref), pytree_leaves(out)):
            torch.testing.assert_close(o, r, **TOL[r.dtype])


def fusions(**nonzero: int) -> dict[str, int]:
    """Expected counts of every fusion pass of the default list: 0 unless given."""
    return {name: nonzero.get(name, 0) for name in default_pass_names() if name.startswith("fuse_")}


def pytree_leaves(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (tuple, list)) else [x]


# --- plain-PyTorch pieces in the shape of models/llama.py ---

class MlpPiece(torch.nn.Module):
    """What a piece between two attentions holds: o_proj output + residual add, norm, MLP, add, next norm."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm2, self.next_norm1 = RMSNorm(hidden, 1e-5), RMSNorm(hidden, 1e-5)
        self.mlp = GatedMLP(hidden, 2 * hidden)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.5)
        self.to(dtype).requires_grad_(False)

    def forward(self, attn_out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = residual + attn_out
        out = h + self.mlp(self.norm2(h))
        return self.next_norm1(out), out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_and_silu_mul(mode, dtype):
    piece = MlpPiece(32, dtype)
    args = (torch.randn(5, 32, dtype=dtype), torch.randn(5, 32, dtype=dtype))
    check_fused(piece, args, mode, ["fuse_add_rms_norm", "fuse_rms_norm", "fuse_silu_mul"],
                {"fuse_add_rms_norm": 2, "fuse_rms_norm": 0, "fuse_silu_mul": 1},
                gone={aten.rsqrt.default, aten.silu.default, aten.mean.dim},
                present={graphmode.fused_add_rms_norm.default, graphmode.silu_and_mul.default},
                rerun_args=(torch.randn(9, 32, dtype=dtype), torch.randn(9, 32, dtype=dtype)))


@pytest.mark.parametrize("mode", MODES)
def test_last_add_keeps_add_and_uses_plain_norm(mode):
    norm = RMSNorm(16, 1e-5).requires_grad_(False)
    check_fused(lambda x, r: norm(x + r), (torch.randn(4, 16), torch.randn(4, 16)), mode, ["default"],
                fusions(fuse_rms_norm=1),
                gone={aten.rsqrt.default}, present={graphmode.rms_norm.default, aten.add.Tensor})


def test_norm_eps_is_matched_not_assumed():
    norm = RMSNorm(16, 3e-4).requires_grad_(False)
    gm = trace(norm, torch.randn(4, 16))
    assert run_passes(gm, "fuse_rms_norm") == {"fuse_rms_norm": 1}
    (node,) = [n for n in gm.graph.nodes if n.target is graphmode.rms_norm.default]
    assert node.args[2] == 3e-4


def test_lookalikes_do_not_match():
    weight = torch.randn(16)

    def norm_over_tokens(x):  # mean over dim 0, not the hidden dim
        return weight * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6))

    def swiglu_over_tokens(x):
        gate, up = x.chunk(2, dim=0)
        return F.silu(gate) * up

    assert run_passes(trace(norm_over_tokens, torch.randn(4, 16)), "fuse_rms_norm") == {"fuse_rms_norm": 0}
    assert run_passes(trace(swiglu_over_tokens, torch.randn(4, 16)), "fuse_silu_mul") == {"fuse_silu_mul": 0}


# --- rotary ---

def gptj_rotary(positions, q, k, cos_sin_cache, head_dim: int = 16):
    """GPT-J style rotary: (even, odd) pairs rotate; same table layout as RotaryEmbedding."""
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)

    def rotate(x):
        shape = x.shape
        x = x.view(shape[0], -1, head_dim)
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2).view(shape)

    return rotate(q), rotate(k)


class QKVRotary(torch.nn.Module):
    """qkv projection, split, rotary: q/k widths are static as in a model (a projection makes them)."""

    def __init__(self, style: str, heads_shape: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, (4 + 2 + 2) * 16, bias=False)
        self.rotary = RotaryEmbedding(16, 64, 10000.0)
        self.style, self.heads_shape = style, heads_shape
        self.to(dtype).requires_grad_(False)

    def forward(self, positions, x):
        q, k, _ = self.qkv(x).split([64, 32, 32], dim=-1)
        if self.heads_shape:
            q, k = q.reshape(x.shape[0], 4, 16), k.reshape(x.shape[0], 2, 16)
        if self.style == "neox":
            return self.rotary(positions, q, k)
        return gptj_rotary(positions, q, k, self.rotary.cos_sin_cache)


def _tokens(tokens: int, dtype: torch.dtype):
    return torch.arange(tokens) * 3 % 64, torch.randn(tokens, 32, dtype=dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("heads_shape", [False, True])
def test_rotary(mode, dtype, style, heads_shape):
    check_fused(QKVRotary(style, heads_shape, dtype), _tokens(5, dtype), mode, ["fuse_rotary"], {"fuse_rotary": 1},
                gone={aten.index_select.default, aten.cat.default, aten.stack.default},
                present={graphmode.rotary_embedding.default}, rerun_args=_tokens(11, dtype))


class QKNormRotary(torch.nn.Module):
    """Attention.forward of Qwen3 up to the attention op."""

    def __init__(self, dtype: torch.dtype, k_eps: float = 1e-6) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, (4 + 2 + 2) * 16, bias=False)
        self.q_norm, self.k_norm = RMSNorm(16, 1e-6), RMSNorm(16, k_eps)
        torch.nn.init.normal_(self.q_norm.weight), torch.nn.init.normal_(self.k_norm.weight)
        self.rotary = RotaryEmbedding(16, 64, 1e6)
        self.to(dtype).requires_grad_(False)

    def forward(self, positions, x):
        q, k, _ = self.qkv(x).split([64, 32, 32], dim=-1)
        q = self.q_norm(q.reshape(q.shape[0], 4, 16))
        k = self.k_norm(k.reshape(k.shape[0], 2, 16))
        return self.rotary(positions, q, k)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rotary(mode, dtype):
    check_fused(QKNormRotary(dtype), _tokens(5, dtype), mode, ["default"],
                fusions(fuse_qk_norm_rotary=1),
                gone={aten.rsqrt.default, aten.index_select.default, aten.cat.default},
                present={graphmode.qk_norm_rotary.default}, rerun_args=_tokens(8, dtype))


def test_qk_norms_with_different_eps_fall_back_to_separate_ops():
    gm = trace(QKNormRotary(torch.float32, k_eps=1e-5), *_tokens(5, torch.float32))
    counts = run_passes(gm, "fuse_qk_norm_rotary", "fuse_rotary", "fuse_rms_norm")
    assert counts == {"fuse_qk_norm_rotary": 0, "fuse_rotary": 1, "fuse_rms_norm": 2}


# --- whole models ---

ARCHS = {  # architecture -> (add+norm, norm, silu_and_mul, rotary, qk_norm_rotary) for 2 layers
    "LlamaForCausalLM": (3, 2, 2, 2, 0),
    "Qwen2ForCausalLM": (3, 2, 2, 2, 0),
    "Qwen3ForCausalLM": (3, 2, 2, 0, 2),
    "Qwen3MoeForCausalLM": (3, 2, 1, 0, 2),  # layer 0 is MoE (fused_moe op), layer 1 dense
}


def _forward_context(model, dtype, query_lens):
    md = AttentionMetadata.build(query_lens, query_lens, [[i + 1] for i in range(len(query_lens))], 16)
    return set_forward_context(md, allocate_kv_caches(model, len(query_lens) + 1, 16, dtype, "cpu"))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_match_counts(arch, dtype):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch), dtype, "cpu", init=True).requires_grad_(False)
    query_lens = [5, 4]
    ids = torch.randint(0, 256, (sum(query_lens),))
    positions = torch.cat([torch.arange(n) for n in query_lens])
    with _forward_context(model, dtype, query_lens):
        gm = trace(lambda i, p: model(i, p), ids, positions, mode="symbolic")
    counts = run_passes(gm, "default")
    add_norm, norm, silu, rotary, qk = ARCHS[arch]
    assert counts == {"noop_elimination": counts["noop_elimination"], **fusions(
        fuse_add_rms_norm=add_norm, fuse_rms_norm=norm, fuse_silu_mul=silu, fuse_rotary=rotary,
        fuse_qk_norm_rotary=qk)}
    assert add_norm == 2 * model.config.num_hidden_layers - 1
    assert not targets(gm) & {aten.rsqrt.default, aten.silu.default, aten.index_select.default}
    with torch.no_grad(), _forward_context(model, dtype, query_lens):
        ref = model(ids, positions)
    with _forward_context(model, dtype, query_lens):
        out = gm(ids, positions)
    torch.testing.assert_close(out, ref, **TOL[dtype])


# --- clean-up and manager ---

def test_noop_elimination_keeps_observable_copies():
    def fn(x):
        same = x.view(x.shape)[:, :]                      # view to same shape, full slice: removed
        copy = torch.ops.aten._to_copy(same, dtype=torch.float32)  # same dtype, never written: removed
        written = x.clone()                               # written below: kept
        written.add_(1)
        transposed = x.t().contiguous()                   # a clone that changes strides: kept
        return copy * 2, written, transposed.view(-1)

    gm = trace(fn, torch.randn(4, 6))
    before = {n.target for n in gm.graph.nodes}
    assert {aten.view.default, aten._to_copy.default, aten.clone.default} <= before
    removed = run_passes(gm, "noop_elimination")["noop_elimination"]
    remaining = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten._to_copy.default not in remaining and remaining.count(aten.clone.default) == 2
    assert removed >= 2
    x = torch.randn(4, 6)
    for r, o in zip(fn(x.clone()), gm(x.clone())):
        torch.testing.assert_close(o, r, atol=0, rtol=0)


def test_unknown_pass_name_lists_known():
    with pytest.raises(ValueError, match="fuse_rotary"):
        PassManager.from_names(["fuse_everything"])


def test_default_expands_and_uuid_tracks_pass_list():
    assert PassManager.from_names(["default"]).names == default_pass_names()
    assert set(default_pass_names()) == set(PASSES) - set(OPT_IN_PASSES)
    # Inductor fuses elementwise chains itself; our fusions would only hide them from it.
    assert PassManager.from_names(["default"], backend_fuses=True).names == ["noop_elimination"]
    assert PassManager.from_names(["default"], backend_fuses=False).names == default_pass_names()
    a = PassManager.from_names(["fuse_rms_norm", "fuse_silu_mul"]).uuid()
    assert a == PassManager.from_names(["fuse_rms_norm", "fuse_silu_mul"]).uuid()
    assert a != PassManager.from_names(["fuse_silu_mul", "fuse_rms_norm"]).uuid()
    assert a != PassManager.from_names(["fuse_rms_norm"]).uuid()


class _DropCastPass(GraphPass):
    """Broken on purpose: removes every dtype cast, so the graph returns the wrong dtype."""

    name = "drop_casts"

    def __call__(self, graph):
        casts = [n for n in graph.nodes if n.target is aten._to_copy.default]
        for node in casts:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        return len(casts)


class _UseBeforeDefinePass(GraphPass):
    """Broken on purpose: moves the output's producer to the top of the graph."""

    name = "use_before_define"

    def __call__(self, graph):
        producer = graph.find_nodes(op="output")[0].args[0][0]
        graph.find_nodes(op="placeholder")[0].prepend(producer)
        return 1


@pytest.mark.parametrize("broken", [_DropCastPass, _UseBeforeDefinePass])
def test_verify_catches_broken_pass(broken):
    gm = trace(lambda x: (x.to(torch.bfloat16) * 2,), torch.randn(3, 4))
    PassManager([broken()])(trace(lambda x: (x.to(torch.bfloat16) * 2,), torch.randn(3, 4)))  # unchecked: no error
    with pytest.raises(PassVerificationError, match=broken.name):
        PassManager([broken()], verify=True)(gm)


def test_record_keeps_code_after_each_pass():
    pm = PassManager.from_names(["fuse_rms_norm", "noop_elimination"], record=True)
    pm(trace(RMSNorm(16).requires_grad_(False), torch.randn(4, 16)))
    assert list(pm.graphs_after) == ["fuse_rms_norm", "noop_elimination"]
    assert "graphmode.rms_norm" in pm.graphs_after["fuse_rms_norm"]


# --- norm into projection (not in the default list) ---

NORM_LINEAR_MATCHES = {  # architecture -> fuse_norm_linear matches for 2 layers
    "LlamaForCausalLM": 4,  # q/k/v (rms_norm first, then add+norm) and gate/up+SiLU per layer
    "Qwen2ForCausalLM": 4,  # q/k/v with bias
    "Qwen3ForCausalLM": 4,
    "Qwen3MoeForCausalLM": 3,  # layer 0's norm also feeds the router: only its q/k/v projection fuses
}


@pytest.mark.parametrize("mode", MODES)
def test_norm_linear_takes_the_gated_projection(mode):
    piece = MlpPiece(32, torch.float32)
    args = (torch.randn(5, 32), torch.randn(5, 32))
    # The last norm feeds no projection in the piece, so it stays an add+norm.
    check_fused(piece, args, mode, ["default", "fuse_norm_linear"],
                {"fuse_add_rms_norm": 2, "fuse_silu_mul": 1, "fuse_norm_linear": 1},
                gone={graphmode.silu_and_mul.default},
                present={graphmode.add_rms_norm_linear.default, graphmode.fused_add_rms_norm.default},
                rerun_args=(torch.randn(9, 32), torch.randn(9, 32)))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_norm_linear_whole_model_bit_identical_off_the_kernel(arch):
    # Off the Triton kernel the fused ops run the ops they replaced: outputs equal bit for bit.
    torch.manual_seed(0)
    dtype = torch.bfloat16
    model = build_model(tiny_config(arch), dtype, "cpu", init=True).requires_grad_(False)
    query_lens = [5, 4]
    ids = torch.randint(0, 256, (sum(query_lens),))
    positions = torch.cat([torch.arange(n) for n in query_lens])
    graphs = {}
    for names in (["default"], ["default", "fuse_norm_linear"]):
        with _forward_context(model, dtype, query_lens):
            gm = trace(lambda i, p: model(i, p), ids, positions, mode="symbolic")
        counts = run_passes(gm, *names)
        with _forward_context(model, dtype, query_lens):
            graphs[len(names)] = gm(ids, positions)
    assert counts["fuse_norm_linear"] == NORM_LINEAR_MATCHES[arch]
    assert {graphmode.rms_norm_linear.default, graphmode.add_rms_norm_linear.default} <= targets(gm)
    assert torch.equal(graphs[1], graphs[2])
