"""Malformed and hostile requests get the documented 4xx in OpenAI's error shape; the server keeps serving."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers.serve import MAX_MODEL_LEN, metric_sum, running_server, scrape

API_KEY = "sk-errors-test"
MODEL = "smollm2"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MiB = 1 << 20
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "Hi"}]


def _chunks(total: int, size: int = 64 * 1024):
    for _ in range(total // size):
        yield b" " * size


# (id, method, path, request kwargs, status, expected "param" (or None = not checked), expected "code" or None)
CASES = [
    ("malformed-json", "POST", COMP, {"content": b'{"prompt": "hi",'}, 400, None, "invalid_json"),
    ("empty-body", "POST", COMP, {"content": b""}, 400, None, "invalid_json"),
    ("not-utf8", "POST", COMP, {"content": b"\xff\xfe{}"}, 400, None, "invalid_json"),
    ("body-is-array", "POST", COMP, {"json": [1, 2]}, 400, None, "invalid_type"),
    ("max-tokens-string", "POST", COMP, {"json": {"prompt": "hi", "max_tokens": "5"}}, 400, "max_tokens", None),
    ("temperature-string", "POST", CHAT, {"json": {"messages": MSGS, "temperature": "hot"}}, 400, "temperature", None),
    ("stream-string", "POST", COMP, {"json": {"prompt": "hi", "stream": "yes"}}, 400, "stream", None),
    ("n-bool", "POST", COMP, {"json": {"prompt": "hi", "n": True}}, 400, "n", None),
    ("seed-float", "POST", COMP, {"json": {"prompt": "hi", "seed": 1.5}}, 400, "seed", None),
    ("seed-2**64", "POST", COMP, {"json": {"prompt": "hi", "seed": 2**64}}, 400, "seed", None),
    ("lone-surrogate-prompt", "POST", COMP, {"content": b'{"prompt": "x\\ud800y"}'}, 400, "prompt", None),
    ("lone-surrogate-message", "POST", CHAT,
     {"content": b'{"messages": [{"role": "user", "content": "x\\udfffy"}]}'}, 400, "messages", None),
    ("nested-100000-deep", "POST", COMP, {"content": b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"}, 400,
     None, "invalid_json"),
    # Refused from its length alone, before the tokenizer spends seconds on it.
    ("prompt-megabyte", "POST", COMP, {"json": {"prompt": "a" * 1_000_000}}, 400, "prompt", "context_length_exceeded"),
    ("messages-megabyte", "POST", CHAT, {"json": {"messages": [{"role": "user", "content": "a" * 1_000_000}]}}, 400,
     "messages", "context_length_exceeded"),
    ("top-logprobs-50", "POST", CHAT, {"json": {"messages": MSGS, "logprobs": True, "top_logprobs": 50}}, 400,
     "top_logprobs", None),
    ("repetition-penalty-tiny", "POST", COMP, {"json": {"prompt": "hi", "repetition_penalty": 1e-300}}, 400,
     "repetition_penalty", None),
    ("prompt-mixed-list", "POST", COMP, {"json": {"prompt": [1, "a"]}}, 400, "prompt", None),
    ("missing-prompt", "POST", COMP, {"json": {"max_tokens": 4}}, 400, "prompt", None),
    ("missing-messages", "POST", CHAT, {"json": {"max_tokens": 4}}, 400, "messages", None),
    ("bad-role", "POST", CHAT, {"json": {"messages": [{"role": "wizard", "content": "hi"}]}}, 400, "messages", None),
    ("content-int", "POST", CHAT, {"json": {"messages": [{"role": "user", "content": 42}]}}, 400, "messages", None),
    ("image-part", "POST", CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}}, 400, "messages", None),
    ("max-tokens-zero", "POST", COMP, {"json": {"prompt": "hi", "max_tokens": 0}}, 400, "max_tokens", None),
    ("max-tokens-negative", "POST", COMP, {"json": {"prompt": "hi", "max_tokens": -5}}, 400, "max_tokens", None),
    ("max-tokens-huge", "POST", COMP, {"json": {"prompt": "hi", "max_tokens": 10**12}}, 400, "max_tokens",
     "context_length_exceeded"),
    ("max-tokens-over-context", "POST", COMP, {"json": {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}}, 400,
     "max_tokens", "context_length_exceeded"),
    ("max-completion-tokens-huge", "POST", CHAT, {"json": {"messages": MSGS, "max_completion_tokens": 10**6}}, 400,
     "max_completion_tokens", "context_length_exceeded"),
    ("prompt-too-long", "POST", COMP, {"json": {"prompt": "hello " * 2000}}, 400, "prompt",
     "context_length_exceeded"),
    ("prompt-ids-too-long", "POST", COMP, {"json": {"prompt": [100] * MAX_MODEL_LEN}}, 400, "prompt",
     "context_length_exceeded"),
    ("messages-too-long", "POST", CHAT, {"json": {"messages": [{"role": "user", "content": "word " * 2000}]}}, 400,
     "messages", "context_length_exceeded"),
    ("empty-prompt", "POST", COMP, {"json": {"prompt": ""}}, 400, "prompt", None),
    ("empty-prompt-list", "POST", COMP, {"json": {"prompt": []}}, 400, "prompt", None),
    ("empty-prompt-in-batch", "POST", COMP, {"json": {"prompt": ["ok", ""]}}, 400, "prompt", None),
    ("empty-messages", "POST", CHAT, {"json": {"messages": []}}, 400, "messages", None),
    ("token-id-out-of-vocab", "POST", COMP, {"json": {"prompt": [10**9]}}, 400, "prompt", None),
    ("negative-token-id", "POST", COMP, {"json": {"prompt": [-1, 5]}}, 400, "prompt", None),
    ("unknown-model", "POST", COMP, {"json": {"prompt": "hi", "model": "gpt-4"}}, 404, "model", "model_not_found"),
    ("unknown-model-chat", "POST", CHAT, {"json": {"messages": MSGS, "model": "nope"}}, 404, "model",
     "model_not_found"),
    ("negative-temperature", "POST", COMP, {"json": {"prompt": "hi", "temperature": -1}}, 400, "temperature", None),
    ("nan-temperature", "POST", COMP, {"content": b'{"prompt": "hi", "temperature": NaN}'}, 400, "temperature", None),
    ("top-p-over-one", "POST", CHAT, {"json": {"messages": MSGS, "top_p": 1.5}}, 400, "top_p", None),
    ("top-k-negative", "POST", COMP, {"json": {"prompt": "hi", "top_k": -5}}, 400, "top_k", None),
    ("min-p-over-one", "POST", COMP, {"json": {"prompt": "hi", "min_p": 2}}, 400, "min_p", None),
    ("presence-penalty-big", "POST", COMP, {"json": {"prompt": "hi", "presence_penalty": 3}}, 400,
     "presence_penalty", None),
    ("repetition-penalty-zero", "POST", COMP, {"json": {"prompt": "hi", "repetition_penalty": 0}}, 400,
     "repetition_penalty", None),
    ("n-too-large", "POST", COMP, {"json": {"prompt": "hi", "n": 17}}, 400, "n", None),
    ("n-zero", "POST", COMP, {"json": {"prompt": "hi", "n": 0}}, 400, "n", None),
    ("logprobs-too-many", "POST", COMP, {"json": {"prompt": "hi", "logprobs": 50}}, 400, "logprobs", None),
    ("top-logprobs-without-logprobs", "POST", CHAT, {"json": {"messages": MSGS, "top_logprobs": 2}}, 400,
     "top_logprobs", None),
    ("empty-stop-string", "POST", COMP, {"json": {"prompt": "hi", "stop": [""]}}, 400, "stop", None),
    ("stop-options-without-stream", "POST", COMP,
     {"json": {"prompt": "hi", "stream_options": {"include_usage": True}}}, 400, "stream_options", None),
    ("logit-bias", "POST", COMP, {"json": {"prompt": "hi", "logit_bias": {"50": 5}}}, 400, "logit_bias", None),
    ("echo", "POST", COMP, {"json": {"prompt": "hi", "echo": True}}, 400, "echo", None),
    ("tools", "POST", CHAT, {"json": {"messages": MSGS, "tools": [{"type": "function"}]}}, 400, "tools", None),
    ("body-too-large", "POST", COMP, {"content": b'{"prompt": "' + b"a" * (5 * MiB) + b'"}'}, 413, None,
     "payload_too_large"),
    ("chunked-body-too-large", "POST", COMP, {"content": _chunks(6 * MiB)}, 413, None, "payload_too_large"),
    ("missing-api-key", "POST", COMP, {"json": {"prompt": "hi"}, "headers": {"Authorization": ""}}, 401, None,
     "invalid_api_key"),
    ("wrong-api-key", "POST", CHAT, {"json": {"messages": MSGS}, "headers": {"Authorization": "Bearer sk-wrong"}},
     401, None, "invalid_api_key"),
    ("wrong-scheme", "GET", "/v1/models", {"headers": {"Authorization": f"Basic {API_KEY}"}}, 401, None,
     "invalid_api_key"),
    ("get-on-post-route", "GET", COMP, {}, 405, None, "method_not_allowed"),
    ("delete-models", "DELETE", "/v1/models", {}, 405, None, "method_not_allowed"),
    ("unknown-v1-route", "POST", "/v1/embeddings", {"json": {"input": "hi"}}, 404, None, "not_found"),
    ("unknown-route", "GET", "/admin", {}, 404, None, "not_found"),
]


@pytest.fixture(scope="module")
def server(smollm2_path):
    with running_server("--served-model-name", MODEL, "--api-key", API_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60.0) as c:  # no default headers: each request sets its own
        yield c


def test_the_table_is_big_enough():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error(http, case):
    _, method, path, kwargs, status, param, code = case
    kwargs = dict(kwargs)
    headers = {**AUTH, **kwargs.pop("headers", {})}
    headers = {k: v for k, v in headers.items() if v}
    r = http.request(method, path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param or (err["param"] or "").startswith(param + "."), err
        assert param.split(".")[0] in err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if status == 401:
        assert r.headers.get("www-authenticate") == "Bearer"


def test_health_and_metrics_need_no_key(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/metrics").status_code == 200


def test_server_still_serves_after_the_abuse(http, server):
    # Runs after the table (file order): nothing above may have broken the engine or leaked a 5xx.
    r = http.post(COMP, headers=AUTH, json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4,
                                            "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]
    with http.stream("POST", CHAT, headers=AUTH, json={"messages": MSGS, "max_tokens": 3, "stream": True}) as s:
        events = [line for line in s.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all("error" not in json.loads(e[6:]) for e in events[:-1])
    metrics = scrape(server)
    assert metric_sum(metrics, "graphmode:http_responses_total") >= len(CASES)
    assert metrics.get("graphmode:http_responses_total{status=5xx}", 0) == 0
    assert metric_sum(metrics, "graphmode:num_requests_running") == 0
    assert metric_sum(metrics, "graphmode:kv_cache_used_blocks") == 0


# ---- in process, with a stub engine: failures that bad input cannot provoke ---------------------------
class _StubEngine:
    """Just enough of AsyncEngine for the app; generation fails the way a server bug would."""

    def __init__(self, alive: bool = True) -> None:
        from types import SimpleNamespace

        self.tokenizer = None
        self.core = SimpleNamespace(max_model_len=64, vocab_size=100, sampling_defaults={})
        self.is_alive = alive

    def stats(self):
        from runtime.engine.outputs import EngineStats

        return [EngineStats(0, 0, 0.0, 0, 8, 0.0, 0)]

    def health_problem(self):
        return None if self.is_alive else "the engine loop is not running"

    async def generate(self, request_id, prompt, params):
        raise RuntimeError("simulated server bug")
        yield  # unreachable: makes this an async generator


def _stub_client(alive: bool = True):
    from fastapi.testclient import TestClient

    from runtime.serve import ServerSettings, create_app

    app = create_app(_StubEngine(alive), ServerSettings(served_model_names=[MODEL]))
    return TestClient(app, raise_server_exceptions=False)


def test_unexpected_error_is_a_logged_500_in_openai_shape(caplog):
    with _stub_client() as c:
        r = c.post(COMP, json={"prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "internal_error" and "simulated" not in r.text
        s = c.post(COMP, json={"prompt": [1, 2, 3], "max_tokens": 4, "stream": True})
        assert s.status_code == 200
        events = [line for line in s.text.splitlines() if line]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "internal_error"
        metrics = c.get("/metrics").text
    assert 'graphmode:http_responses_total{status="5xx"} 1.0' in metrics
    assert any("simulated server bug" in str(rec.exc_info) for rec in caplog.records if rec.exc_info)


def test_health_is_503_when_the_engine_loop_is_dead():
    with _stub_client(alive=False) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert 'graphmode:engine_alive{engine="0"} 0.0' in c.get("/metrics").text
