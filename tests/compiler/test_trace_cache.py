"""The traced graph saved beside the compiled pieces: a warm start skips Dynamo, and an entry that is
stale, unreadable or made for another model or call is traced again, never trusted."""
import logging
import os
import pickle

import pytest
import torch

from compiler import CompilationConfig, counters, support_torch_compile
from compiler.trace_cache import TraceCache, argument_layout, module_fingerprint


@support_torch_compile
class Block(torch.nn.Module):
    def __init__(self, hidden: int = 8, scale: float = 2.0) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)
        self.scale = scale
        self.register_buffer("table", torch.arange(64, dtype=torch.float32))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.relu(self.proj(x)) * self.scale + self.table[positions].unsqueeze(-1)
        return y if bias is None else y + bias


def _config(tmp_path, **kw) -> CompilationConfig:
    return CompilationConfig(mode="compile", backend="eager", graph_mode="none", cache_dir=str(tmp_path / "cache"),
                             **kw)


def _run(model: torch.nn.Module, n: int, **kw) -> torch.Tensor:
    positions = torch.arange(n) % 64
    return model(torch.linspace(-1, 1, n * 8).reshape(n, 8), positions, **kw)


def _twin(tmp_path, **kw) -> tuple[Block, Block]:
    torch.manual_seed(0)
    first = Block(compilation_config=_config(tmp_path), **kw)
    second = Block(compilation_config=_config(tmp_path), **kw)
    second.load_state_dict(first.state_dict())
    return first, second


def _trace_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".trace")]


def test_a_second_model_of_the_same_shape_loads_the_trace_and_matches(tmp_path):
    cold_model, warm_model = _twin(tmp_path)
    counters.reset()
    cold = [_run(cold_model, n) for n in (5, 3, 9)]
    assert (counters.dynamo_traces, counters.traces_loaded) == (1, 0)
    assert len(_trace_files(tmp_path)) == 1
    warm = [_run(warm_model, n) for n in (5, 3, 9)]
    assert (counters.dynamo_traces, counters.traces_loaded) == (1, 1), "no second Dynamo trace"
    for a, b in zip(cold, warm):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert warm_model._compiled_forward.direct is not None


def test_another_shape_attribute_or_argument_layout_is_another_key(tmp_path):
    base = Block(compilation_config=_config(tmp_path))
    args = {"x": torch.zeros(4, 8), "positions": torch.zeros(4, dtype=torch.long), "bias": None}
    key = TraceCache.key(base, args, "decoder")
    assert TraceCache.key(Block(hidden=16, compilation_config=_config(tmp_path)), args, "decoder") != key
    assert TraceCache.key(Block(scale=3.0, compilation_config=_config(tmp_path)), args, "decoder") != key
    assert TraceCache.key(base, dict(args, bias=torch.zeros(4, 8)), "decoder") != key
    assert TraceCache.key(base, args, "encoder") != key
    assert module_fingerprint(base) == module_fingerprint(Block(compilation_config=_config(tmp_path)))
    assert "bias:None" in argument_layout(args)

    # A bias given to a model traced without one is traced for (its own key), not fed to the old graph.
    counters.reset()
    cold_model, warm_model = _twin(tmp_path)
    _run(cold_model, 4)
    bias = torch.ones(4, 8)
    torch.testing.assert_close(_run(warm_model, 4, bias=bias), _run(cold_model, 4) + bias)
    assert counters.dynamo_traces == 2 and counters.traces_loaded == 0


def test_a_truncated_entry_is_traced_again_and_rewritten(tmp_path, caplog):
    cold_model, warm_model = _twin(tmp_path)
    expected = _run(cold_model, 6)
    (path,) = _trace_files(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    counters.reset()
    with caplog.at_level(logging.WARNING, logger="compiler.trace_cache"):
        torch.testing.assert_close(_run(warm_model, 6), expected)
    assert "unreadable" in caplog.text and counters.dynamo_traces == 1
    with open(path, "rb") as f:
        assert pickle.load(f).inputs, "the entry was written again"


def test_an_entry_whose_traced_files_changed_is_stale(tmp_path, caplog):
    cold_model, warm_model = _twin(tmp_path)
    expected = _run(cold_model, 6)
    (path,) = _trace_files(tmp_path)
    with open(path, "rb") as f:
        entry = pickle.load(f)
    assert any(p.endswith("test_trace_cache.py") for p in entry.files), "the model's file is a traced file"
    entry.files = {p: "0" * 64 for p in entry.files}  # as if each had been edited since
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    counters.reset()
    with caplog.at_level(logging.INFO, logger="compiler.trace_cache"):
        torch.testing.assert_close(_run(warm_model, 6), expected)
    assert "stale" in caplog.text and counters.dynamo_traces == 1 and counters.traces_loaded == 0


def test_debug_mode_and_no_cache_root_always_trace(tmp_path):
    assert Block(compilation_config=_config(tmp_path, debug=True))._compiled_forward.traces is None
    no_root = CompilationConfig(mode="compile", backend="eager", graph_mode="none", cache_dir="")
    assert Block(compilation_config=no_root)._compiled_forward.traces is None


@pytest.mark.slow
def test_a_tiny_llama_engine_starts_warm_without_dynamo(tmp_path):
    from models.testing import write_tiny_checkpoint
    from runtime import LLM, SamplingParams

    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "ckpt"))
    common = dict(dtype="float32", max_num_seqs=4, max_model_len=128, kv_cache_memory_gb=0.05,
                  compilation_config=_config(tmp_path))
    prompts, greedy = [[1, 2, 3], [5, 6, 7, 8, 9]], SamplingParams(temperature=0.0, max_tokens=6)
    counters.reset()
    cold = [o.outputs[0].token_ids for o in LLM(path, **common).generate(prompts, greedy, use_tqdm=False)]
    assert (counters.dynamo_traces, counters.traces_loaded) == (1, 0)
    warm = [o.outputs[0].token_ids for o in LLM(path, **common).generate(prompts, greedy, use_tqdm=False)]
    assert (counters.dynamo_traces, counters.traces_loaded) == (1, 1) and warm == cold
