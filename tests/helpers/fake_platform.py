"""A fake device platform for tests/runtime/platforms/test_fake_platform.py (test code, never shipped).

Its tensors live on the CPU, but everything a device platform provides is its own and records its
use: graph class, pool handle and capture context, streams and events, op kernels, attention
backend, compile backend. ``main()`` runs a tiny model through the engine in a process whose
``GRAPHMODE_PLATFORM`` names this class, and prints what the platform was asked for as JSON.

The fake graph is a real static graph in miniature: capture records every ATen op executed (a
TorchDispatchMode), replay re-runs them on the captured tensors and writes each result into the
tensor the capture produced, so outputs keep their addresses and stale inputs give stale results,
as on a device.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import unittest.mock
from collections import Counter
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from runtime.platforms.base import MemoryInfo, Platform
from tests.helpers import REPO_ROOT

CALLS: Counter[str] = Counter()  # what the platform was asked for (read by main())
POOLS_MADE: list["FakePool"] = []  # every pool handle the platform gave out (kept alive: ids stay unique)
POOLS_USED: list["FakePool"] = []  # the pool each capture received
CAPTURE_STREAMS: list[Any] = []  # the stream each capture was asked to run on (None: the platform's)
STREAMS_ENTERED: list[int] = []  # id() of each stream made current


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _refuse_host_read(self: torch.Tensor, *args: Any) -> Any:
    raise RuntimeError("operation not permitted when stream is capturing (fake platform: a host read)")


@contextlib.contextmanager
def _refusing_host_reads() -> Iterator[None]:
    """A device graph cannot hold a host read: CUDA fails the capture of ``.item()`` / ``.tolist()``, and
    so does the fake one (patched at the Python level, so custom ops' own code is covered too)."""
    with unittest.mock.patch.object(torch.Tensor, "item", _refuse_host_read), \
            unittest.mock.patch.object(torch.Tensor, "tolist", _refuse_host_read):
        yield


class FakeGraph:
    def __init__(self) -> None:
        self.ops: list[tuple[Callable, tuple, dict, Any]] = []

    def replay(self) -> None:
        CALLS["graph_replay"] += 1
        for func, args, kwargs, captured in self.ops:
            result = func(*args, **kwargs)
            for old, new in zip(_tensors(captured), _tensors(result)):
                if old.untyped_storage().data_ptr() != new.untyped_storage().data_ptr():
                    old.copy_(new)


class FakePool:
    pass


class FakeEvent:
    def record(self, stream: Any = None) -> None:
        CALLS["event_record"] += 1

    def wait(self, stream: Any = None) -> None:
        CALLS["event_wait"] += 1

    def synchronize(self) -> None:
        CALLS["event_synchronize"] += 1

    def query(self) -> bool:
        return True


class FakeStream:
    def wait_event(self, event: FakeEvent) -> None:
        CALLS["stream_wait_event"] += 1

    def wait_stream(self, stream: "FakeStream") -> None:
        CALLS["stream_wait_stream"] += 1

    def synchronize(self) -> None:
        CALLS["stream_synchronize"] += 1


def _reference_kernel(op_name: str, *args: Any) -> Any:
    from runtime.ops.activation import silu_and_mul_reference
    from runtime.ops.qk_norm_rotary import qk_norm_rotary_reference
    from runtime.ops.rms_norm import fused_add_rms_norm_reference, rms_norm_reference
    from runtime.ops.rotary import rotary_embedding_reference

    references = {"graphmode::rms_norm": rms_norm_reference,
                  "graphmode::fused_add_rms_norm": fused_add_rms_norm_reference,
                  "graphmode::silu_and_mul": silu_and_mul_reference,
                  "graphmode::rotary_embedding": rotary_embedding_reference,
                  "graphmode::qk_norm_rotary": qk_norm_rotary_reference}
    if op_name not in references:
        return None
    CALLS[f"kernel {op_name}"] += 1
    return references[op_name](*args)


# The fake attention backend (this module is also its module path): the torch reference, counted.
def store_kv(key, value, kv_cache, slot_mapping) -> None:
    from runtime.attention import torch_backend

    CALLS["attention store_kv"] += 1
    torch_backend.store_kv(key, value, kv_cache, slot_mapping)


def paged_attention(query, kv_cache, metadata, scale, sliding_window, out) -> None:
    from runtime.attention import torch_backend

    CALLS["attention paged_attention"] += 1
    torch_backend.paged_attention(query, kv_cache, metadata, scale, sliding_window, out)


class FakePlatform(Platform):
    name = "fake"
    device_type = "cpu"
    attention_backend = "fake"
    op_kernels = "torch"
    default_compile_backend = "eager"
    supports_static_graphs = True
    supports_streams = True
    extra_compile_backends = ("fake-compiler",)

    def __init__(self) -> None:
        self.default_stream = FakeStream()

    def new_graph(self) -> FakeGraph:
        CALLS["new_graph"] += 1
        return FakeGraph()

    def graph_pool_handle(self) -> FakePool:
        CALLS["graph_pool_handle"] += 1
        POOLS_MADE.append(FakePool())
        return POOLS_MADE[-1]

    @contextlib.contextmanager
    def graph_capture(self, graph: FakeGraph, pool: Any, stream: Any = None) -> Iterator[None]:
        CALLS["graph_capture"] += 1
        POOLS_USED.append(pool)
        CAPTURE_STREAMS.append(stream)
        with _Recorder(graph.ops), _refusing_host_reads():
            yield

    def op_kernel(self, op_name: str) -> Callable[..., Any] | None:
        return functools.partial(_reference_kernel, op_name)

    def extra_attention_backends(self) -> dict[str, str]:
        return {"fake": __name__}

    def compile_backend(self, name: str) -> Callable | None:
        if name != "fake-compiler":
            return None

        def compile_fn(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
            CALLS["compile fake-compiler"] += 1
            return gm

        return compile_fn

    def new_stream(self) -> FakeStream:
        CALLS["new_stream"] += 1
        return FakeStream()

    def current_stream(self) -> FakeStream:
        return self.default_stream

    @contextlib.contextmanager
    def stream_context(self, stream: Any) -> Iterator[None]:
        STREAMS_ENTERED.append(id(stream))
        yield

    def new_event(self) -> FakeEvent:
        CALLS["new_event"] += 1
        return FakeEvent()

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(free_bytes=1 << 30, total_bytes=2 << 30)


def _generate(path: str, config: dict) -> list[list[int]]:
    from compiler import CompilationConfig
    from models.loader import load_model
    from runtime import LLM
    from runtime.contracts.sampling_params import SamplingParams

    loaded = load_model(path, dtype="float32", device="cpu", compilation_config=CompilationConfig(**config))
    llm = LLM.from_loaded(loaded, max_num_seqs=4, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=32)
    prompts = [[5, 9, 13, 2, 77], list(range(30, 50)), [101], [7, 7, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def main() -> None:
    from models.testing import write_tiny_checkpoint
    from runtime.platforms import current_platform
    from runtime.ubatching import run_ubatches

    report: dict[str, Any] = {"platform": type(current_platform).__name__}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint("LlamaForCausalLM", tmp)
        # Full graphs of the uncompiled model: the fake capture (a dispatch mode) cannot run Dynamo's code.
        report["piecewise_tokens"] = _generate(path, dict(mode="compile", backend="fake-compiler", debug=True,
                                                          graph_mode="piecewise", capture_sizes=[1, 2, 4, 8]))
        report["full_tokens"] = _generate(path, dict(mode="eager", graph_mode="full", capture_sizes=[1, 2, 4],
                                                     debug=True))
        report["graph_calls"] = dict(CALLS)
        # Which handed-out pool (by index) each capture received.
        report["capture_pools"] = [next(i for i, p in enumerate(POOLS_MADE) if p is used) for used in POOLS_USED]
        report["eager_tokens"] = _generate(path, dict(mode="eager"))
    streams = [current_platform.new_stream(), current_platform.new_stream()]
    report["ubatch_results"] = run_ubatches([lambda: threading.current_thread().name, lambda: 2], streams=streams)
    report["streams_made"] = [id(s) for s in streams]
    report["streams_entered"] = STREAMS_ENTERED
    report["stream_calls"] = {k: v for k, v in CALLS.items() if "event" in k or "stream" in k}
    json.dump(report, sys.stdout)


def tensor_parallel_main() -> None:
    """Full graphs under tensor parallelism: each worker process replays its own graphs (the engine's
    process replays none), and the engine must still count them."""
    from compiler import counters
    from models.testing import write_tiny_checkpoint
    from runtime import LLM
    from runtime.contracts.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 9, 13, 2, 77], [101], [7, 7, 7]]
    full = dict(mode="eager", graph_mode="full", capture_sizes=[1, 2, 4])
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint("LlamaForCausalLM", tmp)
        for name, tp, compilation in (("eager", 1, None), ("tp2_full", 2, full)):
            llm = LLM(path, tensor_parallel_size=tp, compilation_config=compilation, max_num_seqs=4,
                      max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=32, dtype="float32")
            outs = llm.generate(prompts, params, use_tqdm=False)
            report[name] = dict(tokens=[o.outputs[0].token_ids for o in outs], steps=llm.engine.num_steps,
                                replays=llm.engine.graph_replays, eager_steps=llm.engine.eager_steps)
            llm.engine.shutdown()
    report["engine_process_replays"] = counters.graph_replays
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    raise SystemExit("import this module and call main() (see tests/runtime/platforms/test_fake_platform.py)")


def run_with_fake_platform(code: str) -> Any:
    """Run ``code`` in a fresh process whose platform is FakePlatform; the JSON its last stdout line
    holds. ``runtime.platforms`` is imported first: it loads this module as the platform plugin."""
    root = str(REPO_ROOT)
    env = dict(os.environ, GRAPHMODE_PLATFORM="tests.helpers.fake_platform:FakePlatform", PYTHONPATH=root)
    env.pop("GRAPHMODE_OP_KERNELS", None)
    env.pop("GRAPHMODE_ATTENTION_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", f"import runtime.platforms; {code}"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
