"""/start_profile and /stop_profile (``--profiler-dir``): a trace that loads as Chrome trace JSON and holds the
model's ops; clear 400s when profiling is off or the calls come out of order."""
import json
import os

import pytest
from fastapi.testclient import TestClient

from models.loader import load_model
from models.testing import write_tiny_checkpoint
from runtime.contracts.config import EngineConfig
from runtime.engine.async_engine import AsyncEngine
from runtime.engine.core import EngineCore
from runtime.serve.app import create_app
from runtime.serve.settings import ServerSettings


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path_factory.mktemp("profiler") / "llama"))
    loaded = load_model(path, dtype="float32", device="cpu")
    eng = AsyncEngine(EngineCore(EngineConfig(max_num_seqs=4, max_model_len=128, num_kv_blocks=32), loaded))
    yield eng
    eng.shutdown()


def _client(engine, profiler_dir):
    return TestClient(create_app(engine, ServerSettings(served_model_names=["tiny"], profiler_dir=profiler_dir)))


def test_a_profiled_request_leaves_a_trace_perfetto_can_open(engine, tmp_path):
    with _client(engine, str(tmp_path)) as http:
        assert http.post("/start_profile").json() == {"status": "profiling", "directory": str(tmp_path)}
        again = http.post("/start_profile")
        assert again.status_code == 400 and "already running" in again.json()["error"]["message"]
        body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
        assert http.post("/v1/completions", json=body).status_code == 200
        stopped = http.post("/stop_profile").json()
    (trace,) = stopped["traces"]
    assert os.path.dirname(trace) == str(tmp_path) and os.path.basename(trace).startswith("graphmode-rank0-")
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(name.startswith("aten::") for name in names)  # the forward's ops are in it
    assert any("graphmode::" in name for name in names), sorted(names)[:50]  # our custom ops too


def test_out_of_order_or_off_is_a_clear_400(engine, tmp_path):
    with _client(engine, str(tmp_path)) as http:
        stop = http.post("/stop_profile")
        assert stop.status_code == 400 and "not running" in stop.json()["error"]["message"]
    with _client(engine, None) as http:
        off = http.post("/start_profile")
        assert off.status_code == 400 and "--profiler-dir" in off.json()["error"]["message"]
