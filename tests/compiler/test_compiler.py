"""The compiler on a toy model written here, with a splitting op registered here."""
import json

import pytest
import torch
from torch import nn

from compiler import CompilationConfig, counters, support_torch_compile, use_config


@torch.library.custom_op("graphmode_test::mix", mutates_args=("out",))
def mix(x: torch.Tensor, out: torch.Tensor) -> None:
    """A stand-in for attention: mixes rows (so it depends on the whole batch), writes into ``out``."""
    out.copy_(x + x.mean(dim=0, keepdim=True))


@mix.register_fake
def _(x, out):
    return None


@support_torch_compile(dynamic_arg_dims={"x": 0, "scale": 0})
class Toy(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        for layer, norm in zip(self.layers, self.norms):
            h = torch.relu(layer(norm(x))) * scale[:, None]
            out = torch.empty_like(h)
            torch.ops.graphmode_test.mix(h, out)
            x = x + out
        return x.sum(dim=-1)


def _reference(model: Toy, x, scale):
    return type(model).original_forward(model, x, scale)


@pytest.fixture(autouse=True)
def _fresh_counters():
    counters.reset()
    yield


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
def test_toy_matches_eager_for_every_size_with_one_trace(backend, split):
    config = CompilationConfig(mode="compile", backend=backend,
                               splitting_ops=["graphmode_test::mix"] if split else [])
    torch.manual_seed(0)
    with use_config(config):
        model = Toy()
    with torch.no_grad():
        for n in range(1, 41):
            x, scale = torch.randn(n, 16), torch.rand(n)
            torch.testing.assert_close(model(x, scale), _reference(model, x, scale), atol=1e-5, rtol=1e-5)
    assert counters.dynamo_traces == 1
    # 3 splitting ops cut the graph into 4 compiled pieces (before, between x2, after); none: 1 piece.
    assert counters.piecewise_graphs == (4 if split else 1)
    assert counters.backend_compilations == counters.piecewise_graphs


def test_config_from_constructor_keyword_wins_and_eager_mode_does_not_compile():
    with use_config(CompilationConfig(mode="compile", backend="eager")):
        model = Toy(compilation_config=CompilationConfig(mode="eager"))
    model(torch.randn(3, 16), torch.rand(3))
    assert counters.dynamo_traces == 0


def test_enable_if_can_switch_compilation_off():
    @support_torch_compile(enable_if=lambda cfg: cfg.backend == "inductor")
    class Small(nn.Module):
        def forward(self, x):
            return x * 2

    Small(compilation_config=CompilationConfig(mode="compile", backend="eager"))(torch.ones(2))
    assert counters.dynamo_traces == 0


def test_two_instances_with_different_configs_compile_separately():
    a = Toy(compilation_config=CompilationConfig(mode="compile", backend="eager", splitting_ops=[]))
    b = Toy(compilation_config=CompilationConfig(mode="compile", backend="eager",
                                                 splitting_ops=["graphmode_test::mix"]))
    x, s = torch.randn(5, 16), torch.rand(5)
    a(x, s), b(x, s)
    assert counters.dynamo_traces == 2 and counters.piecewise_graphs == 1 + 4


def test_debug_mode_turns_a_recompile_into_a_clear_error():
    from compiler import RecompileError

    model = Toy(compilation_config=CompilationConfig(mode="compile", backend="eager", debug=True,
                                                     splitting_ops=["graphmode_test::mix"]))
    model(torch.randn(4, 16), torch.rand(4))
    model(torch.randn(9, 16), torch.rand(9))  # another size: no recompile
    model(torch.randn(1, 16), torch.rand(1))  # nor a single token (no 0/1 specialisation)
    with pytest.raises(RecompileError, match="need a new trace"):
        model(torch.randn(4, 16, dtype=torch.float64), torch.rand(4, dtype=torch.float64))


@pytest.mark.parametrize("bad,field", [({"mode": "fast"}, "mode"), ({"graph_mode": "all"}, "graph_mode"),
                                       ({"capture_sizes": [0, 2]}, "capture_sizes"),
                                       ({"splitting_ops": ["attention"]}, "splitting_ops"),
                                       ({"bogus": 1}, "bogus")])
def test_config_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        CompilationConfig.from_dict(bad)


def test_config_json_round_trip_and_code_hash():
    cfg = CompilationConfig.from_json('{"mode": "compile", "backend": "eager", "encoder": {"mode": "eager"}}')
    assert cfg.encoder.mode == "eager" and cfg.for_encoder() is cfg.encoder
    assert CompilationConfig.from_dict(cfg.to_dict()).code_hash() == cfg.code_hash()
    assert CompilationConfig(mode="compile", passes=[]).code_hash() != CompilationConfig(mode="compile").code_hash()
    assert CompilationConfig(dump_dir="/x").code_hash() == CompilationConfig().code_hash()
    with pytest.raises(ValueError, match="not valid JSON"):
        CompilationConfig.from_json("{mode: compile}")


def test_dump_dir_writes_readable_graphs_and_manifest(tmp_path):
    model = Toy(compilation_config=CompilationConfig(mode="compile", backend="eager", dump_dir=str(tmp_path),
                                                     splitting_ops=["graphmode_test::mix"]))
    model(torch.randn(6, 16), torch.rand(6))
    tag_dir = tmp_path / "decoder"
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["backend"] == "eager"
    assert len(manifest["pieces"]) == 7 and sum(p["is_splitting_op"] for p in manifest["pieces"]) == 3
    mix_piece = next(p for p in manifest["pieces"] if p["is_splitting_op"])
    assert mix_piece["op_counts"] == {"graphmode_test::mix": 1}
    for name in ["dynamo"] + [f"piece_{p['index']}" for p in manifest["pieces"]]:
        source = (tag_dir / f"{name}.py").read_text()
        compile(source, name, "exec")  # readable, valid Python
        assert "def forward" in source


def test_after_the_first_trace_calls_skip_dynamo():
    model = Toy(compilation_config=CompilationConfig(mode="compile", backend="eager",
                                                     splitting_ops=["graphmode_test::mix"]))
    with torch.no_grad():
        model(torch.randn(3, 16), torch.rand(3))
        compiled = model._compiled_forward
        assert compiled.direct is not None

        def dynamo_entered(*args, **kwargs):
            raise AssertionError("Dynamo's frame was entered after the first trace")

        compiled.compiled = dynamo_entered
        for n in (1, 7, 33):
            x, scale = torch.randn(n, 16), torch.rand(n)
            torch.testing.assert_close(model(x, scale), _reference(model, x, scale), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(x, scale=scale), _reference(model, x, scale), atol=1e-5, rtol=1e-5)


@support_torch_compile(dynamic_arg_dims={"x": 0, "extra": 0})
class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None):
        h = self.proj(x)
        if extra is not None:
            h = h + extra
        return h, h.sum(dim=-1)


def test_direct_call_keeps_tuple_outputs_and_refuses_an_argument_traced_as_none():
    model = TwoOutputs(compilation_config=CompilationConfig(mode="compile", backend="eager"))
    with torch.no_grad():
        model(torch.randn(2, 8))
        x = torch.randn(5, 8)
        h, s = model(x)
        ref_h, ref_s = type(model).original_forward(model, x)
        torch.testing.assert_close(h, ref_h)
        torch.testing.assert_close(s, ref_s)
        with pytest.raises(TypeError, match="'extra' was None when the model was traced"):
            model(x, torch.ones(5, 8))


def test_a_compiled_model_is_freed_when_dropped():
    """Dynamo keeps every backend it saw for the life of the process: ours must not pin the model,
    its pieces or (on devices with graphs) their memory pool."""
    import gc
    import weakref

    model = Toy(compilation_config=CompilationConfig(mode="compile", backend="eager",
                                                     splitting_ops=["graphmode_test::mix"]))
    with torch.no_grad():
        model(torch.randn(3, 16), torch.rand(3))
        model(torch.randn(5, 16), torch.rand(5))
    weight, backend = weakref.ref(model.layers[0].weight), weakref.ref(model._compiled_forward.backend)
    del model
    gc.collect()
    assert weight() is None and backend() is None


def test_options_a_backend_cannot_honour_are_named_not_silently_dropped(caplog):
    import logging

    from compiler import CompilationConfig, support_torch_compile

    @support_torch_compile
    class Twice(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    config = CompilationConfig(mode="compile", backend="eager", compile_sizes=[4], cache_dir="/tmp/unused-cache")
    with caplog.at_level(logging.INFO, logger="compiler.backend"):
        Twice(compilation_config=config)
    assert "cache_dir keeps only the traced graph: the eager backend" in caplog.text
    assert "compile_sizes are ignored: the eager backend" in caplog.text
