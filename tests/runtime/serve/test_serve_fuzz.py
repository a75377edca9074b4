"""Schema fuzzing: hypothesis writes request bodies (valid, out of range, wrongly typed, malformed JSON) and
they are sent in concurrent rounds to a running server on loopback.

Whatever the body, the answer is a 2xx or a 4xx in OpenAI's error shape, never a 5xx; every 200 stream ends
with ``[DONE]``; and once the rounds end, no request is running and no KV block is in use.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import hypothesis
import pytest
from hypothesis import strategies as st

from tests.helpers.serve import metric_sum, running_server, scrape

ROUNDS = 12
REQUESTS_PER_ROUND = 48  # sent at once: 576 requests in all
MAX_MODEL_LEN = 96  # short, so even a request with no max_tokens ends within a few seconds
REQUEST_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 30.0

# ---- what hypothesis writes ---------------------------------------------------------------------------
_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5)


def _field(valid):
    """Mostly a value of the right type (in range or just outside it), sometimes anything at all."""
    return st.one_of(valid, valid, _junk)


_text = st.text(max_size=40) | st.sampled_from(["Hello", "x\ud800y", "\x00", "<|im_end|>", "é" * 30, "word " * 80])
_token_ids = st.lists(st.integers(-3, 49_200), min_size=0, max_size=24)

_SAMPLING = {
    "model": _field(st.sampled_from(["smollm2", "no-such-model"])),
    "n": _field(st.integers(-1, 3) | st.just(17)),
    "temperature": _field(st.floats(-1, 3)),
    "top_p": _field(st.floats(-0.5, 1.5)),
    "top_k": _field(st.integers(-2, 60)),
    "min_p": _field(st.floats(-0.5, 1.5)),
    "presence_penalty": _field(st.floats(-3, 3)),
    "frequency_penalty": _field(st.floats(-3, 3)),
    "repetition_penalty": _field(st.floats(0, 150) | st.just(1e-300)),
    "seed": _field(st.integers(-2**64, 2**65)),
    "stop": _field(_text | st.lists(_text, max_size=18)),
    "stop_token_ids": _field(st.lists(st.integers(-2, 60_000), max_size=4)),
    "ignore_eos": _field(st.booleans()),
    "min_tokens": _field(st.integers(-1, 6)),
    "skip_special_tokens": _field(st.booleans()),
    "include_stop_str_in_output": _field(st.booleans()),
    "stream": st.booleans(),
    "stream_options": _field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logit_bias": _field(st.sampled_from([{}, {"5": 1.0}])),
}
_COMPLETION = {
    **_SAMPLING,
    "max_tokens": _field(st.integers(-1, 8) | st.none()),
    "logprobs": _field(st.integers(-1, 22)),
    "echo": _field(st.booleans()),
    "suffix": _field(_text),
    "best_of": _field(st.integers(0, 3)),
}
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "data:,", "http://127.0.0.1:1/x.png"])})}),
    _junk)
_message = st.fixed_dictionaries(
    {"role": _field(st.sampled_from(["system", "user", "assistant", "tool", "wizard"]))},
    optional={"content": _field(_text | st.lists(_part, max_size=3)), "name": _field(_text)})
_CHAT = {
    **_SAMPLING,
    "max_tokens": _field(st.integers(-1, 8) | st.none()),
    "max_completion_tokens": _field(st.integers(-1, 8)),
    "logprobs": _field(st.booleans()),
    "top_logprobs": _field(st.integers(-1, 22)),
    "tools": _field(st.sampled_from([[], [{"type": "function"}]])),
    "response_format": _field(st.sampled_from([{"type": "text"}, {"type": "json_object"}])),
    "add_generation_prompt": _field(st.booleans()),
}


def _body(required: dict, optional: dict):
    return st.fixed_dictionaries(required, optional=optional)


_request = st.one_of(
    st.tuples(st.just("/v1/completions"), _body(
        {"prompt": _field(_text | _token_ids | st.lists(_text, max_size=3) | st.lists(_token_ids, max_size=3))},
        _COMPLETION)),
    st.tuples(st.just("/v1/chat/completions"), _body({"messages": _field(st.lists(_message, max_size=3))}, _CHAT)),
    # Not a JSON object at all: random bytes, a cut-off body, NaN (not JSON, though Python writes it).
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
              st.binary(max_size=40) | st.sampled_from([b'{"prompt": "a', b'{"prompt": NaN}', b"[]", b"null"])),
)


# ---- sending ------------------------------------------------------------------------------------------
def _encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


async def _send(http: httpx.AsyncClient, path: str, body) -> str | None:
    """What was wrong with the answer, or None."""
    stream = isinstance(body, dict) and body.get("stream") is True
    async with http.stream("POST", path, content=_encode(body), headers={"content-type": "application/json"}) as r:
        raw = await r.aread()
    if r.status_code >= 500:
        return f"{r.status_code}: {raw[:300]!r}"
    if r.status_code >= 400:
        try:
            error = json.loads(raw)["error"]
            assert isinstance(error["message"], str) and error["message"]
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"{r.status_code} not in OpenAI's error shape: {raw[:300]!r}"
        return None
    if stream and not raw.rstrip().endswith(b"data: [DONE]"):
        return f"stream did not end with [DONE]: ...{raw[-300:]!r}"
    return None


async def _round(base_url: str, requests: list) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as http:
        problems = await asyncio.gather(*(_send(http, path, body) for path, body in requests))
    return [f"{path} {_encode(body)[:400]!r}\n  -> {p}" for (path, body), p in zip(requests, problems) if p]


@pytest.fixture(scope="module")
def server(smollm2_path):
    with running_server("--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "32") as url:
        yield url


def test_fuzzed_requests_get_no_5xx_and_leave_nothing_behind(server):
    sent: list[int] = []

    @hypothesis.settings(max_examples=ROUNDS, deadline=None, derandomize=True, database=None,
                         phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(_request, min_size=REQUESTS_PER_ROUND, max_size=REQUESTS_PER_ROUND))
    def one_round(requests):
        problems = asyncio.run(_round(server, requests))
        sent.append(len(requests))
        assert not problems, "\n".join(problems[:5])

    one_round()
    assert sum(sent) >= 500
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        metrics = scrape(server)
        left = (metric_sum(metrics, "graphmode:num_requests_running"),
                metric_sum(metrics, "graphmode:kv_cache_used_blocks"))
        if left == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert left == (0, 0), f"requests running / KV blocks in use after the fuzz: {left}"
    assert metric_sum(metrics, "graphmode:http_responses_total") >= sum(sent)
    assert metrics.get("graphmode:http_responses_total{status=5xx}", 0) == 0
