"""Bounded load: 32 concurrent streaming clients, some hanging up mid-stream; no 5xx, no leaked KV blocks.

``GRAPHMODE_LOAD_SECONDS`` (default 60) bounds how long clients keep starting new requests.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.helpers.serve import metric_sum, running_server, scrape, signal_server

CLIENTS = 32
DISCONNECT_EVERY = 4  # every 4th request of a client hangs up after a couple of events
DRAIN_TIMEOUT_S = 60.0
TOPICS = ["the sea", "a cat", "Paris", "mountains", "the moon", "coffee", "trains", "winter"]
LOAD_SECONDS = float(os.environ.get("GRAPHMODE_LOAD_SECONDS", "60"))


@dataclass
class Tally:
    completed: int = 0
    disconnected: int = 0
    tokens: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    bad_streams: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def server(smollm2_path):
    with running_server() as url:
        yield url


def _request(rng: random.Random) -> tuple[str, dict]:
    max_tokens = rng.randint(8, 24)
    common = {"max_tokens": max_tokens, "temperature": 0.8, "seed": rng.randrange(10**6), "stream": True,
              "stream_options": {"include_usage": True}}
    topic = rng.choice(TOPICS)
    if rng.random() < 0.5:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Write about {topic}."}], **common}
    return "/v1/completions", {"prompt": f"A short story about {topic}:", **common}


async def _one(http: httpx.AsyncClient, path: str, body: dict, hang_up: bool, tally: Tally) -> None:
    async with http.stream("POST", path, json=body) as r:
        tally.statuses[r.status_code] = tally.statuses.get(r.status_code, 0) + 1
        if r.status_code != 200:
            await r.aread()
            tally.bad_streams.append(f"{r.status_code}: {r.text[:200]}")
            return
        events: list[str] = []
        async for line in r.aiter_lines():
            if not line:
                continue
            events.append(line)
            if hang_up and len(events) == 2:
                tally.disconnected += 1
                return  # leaving the block closes the connection mid-stream
    if events[-1:] != ["data: [DONE]"] or any(not e.startswith("data: ") for e in events):
        tally.bad_streams.append(f"stream did not end with [DONE]: {events[-2:]}")
        return
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    if any("error" in p for p in payloads):
        tally.bad_streams.append(f"error event: {payloads[-1]}")
        return
    tally.completed += 1
    tally.tokens += payloads[-1]["usage"]["completion_tokens"]


async def _client(http: httpx.AsyncClient, index: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(index)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        path, body = _request(rng)
        try:
            await _one(http, path, body, hang_up=(n + index) % DISCONNECT_EVERY == 0, tally=tally)
        except httpx.TransportError as e:
            tally.transport_errors.append(repr(e))


async def _monitor(base: str, stop: asyncio.Event, samples: list[dict[str, float]]) -> None:
    async with httpx.AsyncClient(timeout=30.0) as http:
        while not stop.is_set():
            text = (await http.get(f"{base}/metrics")).text
            samples.append(_parse(text))
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)  # paces the scrapes; ends at once when done
            except asyncio.TimeoutError:
                pass


def _parse(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def _load(base: str, seconds: float) -> tuple[Tally, list[dict[str, float]], float]:
    tally, samples, stop = Tally(), [], asyncio.Event()
    limits = httpx.Limits(max_connections=CLIENTS * 2, max_keepalive_connections=CLIENTS * 2)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(120.0)) as http:
        monitor = asyncio.create_task(_monitor(base, stop, samples))
        start = time.monotonic()
        await asyncio.gather(*[_client(http, i, start + seconds, tally) for i in range(CLIENTS)])
        elapsed = time.monotonic() - start
        stop.set()
        await monitor
    return tally, samples, elapsed


def _wait_for_idle(base: str, expected_requests: int) -> dict[str, float]:
    """Aborts travel through the engine's inbox: poll (bounded) until every request is accounted for."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        m = scrape(base)
        ended = metric_sum(m, "graphmode:request_success_total") + m["graphmode:request_abort_total"]
        idle = metric_sum(m, "graphmode:num_requests_running") + metric_sum(m, "graphmode:num_requests_waiting") == 0
        if (idle and metric_sum(m, "graphmode:kv_cache_used_blocks") == 0 and ended >= expected_requests) \
                or time.monotonic() > deadline:
            return m
        httpx.get(f"{base}/health", timeout=5.0)  # one round trip between scrapes


def test_streaming_load_with_disconnects(server):
    before = scrape(server)
    tally, samples, elapsed = asyncio.run(_load(server, LOAD_SECONDS))
    started = tally.completed + tally.disconnected
    after = _wait_for_idle(server, started)

    generated = metric_sum(after, "graphmode:generation_tokens_total") \
        - metric_sum(before, "graphmode:generation_tokens_total")
    print(f"\nload: {CLIENTS} clients for {LOAD_SECONDS:.0f} s (ran {elapsed:.1f} s): {tally.completed} streams "
          f"completed, {tally.disconnected} disconnected mid-stream, {tally.tokens} tokens in completed streams, "
          f"{generated:.0f} generated in all = {generated / elapsed:.1f} tokens/s; statuses {tally.statuses}; "
          f"peak running {max(metric_sum(s, 'graphmode:num_requests_running') for s in samples):.0f}, "
          f"peak waiting {max(metric_sum(s, 'graphmode:num_requests_waiting') for s in samples):.0f}")

    assert not [s for s in tally.statuses if s >= 500], tally.statuses
    assert not tally.transport_errors, tally.transport_errors[:5]
    assert not tally.bad_streams, tally.bad_streams[:5]
    assert tally.completed >= CLIENTS and tally.disconnected >= 1
    # Every stream the server started ended exactly once, as a success or an abort.
    ended = metric_sum(after, "graphmode:request_success_total") + after["graphmode:request_abort_total"] \
        - metric_sum(before, "graphmode:request_success_total") - before["graphmode:request_abort_total"]
    assert ended == started
    assert after["graphmode:request_abort_total"] - before["graphmode:request_abort_total"] >= 1
    assert after.get("graphmode:http_responses_total{status=5xx}", 0) == 0
    # Nothing left behind.
    assert metric_sum(after, "graphmode:num_requests_running") == 0
    assert metric_sum(after, "graphmode:num_requests_waiting") == 0
    assert metric_sum(after, "graphmode:kv_cache_used_blocks") == 0
    # /metrics moved while the load ran.
    assert generated >= tally.tokens > 0
    mid = [metric_sum(s, "graphmode:generation_tokens_total") for s in samples]
    assert len(mid) >= 2 and mid[-1] > mid[0], mid
    assert max(metric_sum(s, "graphmode:num_requests_running") for s in samples) > 0
    assert max(metric_sum(s, "graphmode:kv_cache_used_blocks") for s in samples) > 0
    assert metric_sum(after, "graphmode:engine_steps_total") > metric_sum(before, "graphmode:engine_steps_total")
    ttft_count = "graphmode:time_to_first_token_seconds_count"
    assert after[ttft_count] >= before[ttft_count] + tally.completed


def test_sigterm_ends_streams_in_flight(server):
    """Last in this module: SIGTERM aborts running streams (error event, then [DONE]) and the server exits 0."""
    body = {"prompt": "Tell me a very long story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server, timeout=60.0) as http:
        responses = [http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
                     for _ in range(2)]
        lines = [r.iter_lines() for r in responses]
        for it in lines:  # both requests are generating
            assert next(line for line in it if line).startswith("data: {")
        proc = signal_server(server)
        tails = [[line for line in it if line] for it in lines]
        proc.wait(60)
    for tail in tails:
        assert tail[-1] == "data: [DONE]"
        error = json.loads(tail[-2][6:])["error"]
        assert error["code"] == "engine_unavailable" and "shutting down" in error["message"]
        texts = [json.loads(t[6:])["choices"][0]["text"] for t in tail[:-2]]
        assert len(texts) < 399  # cut short, not run to max_tokens
    assert proc.returncode == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server}/health", timeout=5.0)
