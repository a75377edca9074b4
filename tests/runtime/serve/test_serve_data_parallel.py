"""``python -m runtime.serve --data-parallel-size 2`` on SmolLM2 (CPU): two engine cores behind one server (and
two API server processes).

Concurrent requests spread over both cores (the engine label on the metrics says so), the
``X-data-parallel-rank`` header pins a request (400 for a rank that does not exist), a core killed
mid-request fails its requests with an error event and turns /health to 503. A second "node" on
loopback (``--headless``) runs rank 1 for a server that runs rank 0 only.
"""
import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
from openai import AsyncOpenAI

from tests.helpers import REPO_ROOT
from tests.helpers.serve import free_port, metric_sum, running_server, scrape, server_log, wait_for_exit

CHAT = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 6, "temperature": 0}


def _core_pids(base: str) -> dict[int, int]:
    return {int(r): int(p) for r, p in re.findall(r"engine core (\d+) connected: pid (\d+)", server_log(base))}


def _pinned(base: str, rank, body=CHAT) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers={"X-data-parallel-rank": str(rank)},
                      timeout=120)


async def _concurrent_chats(base: str, count: int) -> list[str]:
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="none", timeout=300)
    answers = await asyncio.gather(*[client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": f"Say a word about {i}."}],
        max_tokens=4) for i in range(count)])
    await client.close()
    return [a.choices[0].message.content for a in answers]


def _stream_until_error(base: str, rank: int, kill) -> list[str]:
    """A long stream pinned to ``rank``; ``kill()`` once its first token is out. The events it got."""
    body = dict(CHAT, max_tokens=400, stream=True, ignore_eos=True)
    events = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers={"X-data-parallel-rank": str(rank)},
                      timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    kill()
    return events


def _until_both_api_servers_report_503(base: str, in_a_row: int = 16, timeout_s: float = 30.0) -> None:
    """New connections land on either API server process: many 503s in a row mean both have seen the death."""
    deadline, seen = time.monotonic() + timeout_s, 0
    while seen < in_a_row:
        assert time.monotonic() < deadline, "an API server process kept answering /health with 200"
        seen = seen + 1 if httpx.get(f"{base}/health", timeout=10).status_code == 503 else 0


def test_two_engine_cores_share_the_load_and_survive_a_dead_one_when_tolerated():
    # Two API server processes on the one port, each a front to both cores: whichever answers a request (or a
    # scrape, with the counters of both) must see the same cores, alive or dead.
    with running_server("--data-parallel-size", "2", "--api-server-count", "2",
                        "--data-parallel-tolerate-failure") as base:
        answers = asyncio.run(_concurrent_chats(base, 32))
        assert len(answers) == 32 and all(answers)
        assert "(API server 0 of 2)" in server_log(base) and "(API server 1 of 2)" in server_log(base)
        tokens = scrape(base)
        assert metric_sum(tokens, "graphmode:request_success_total") >= 32
        assert tokens['graphmode:generation_tokens_total{engine=0}'] > 0
        assert tokens['graphmode:generation_tokens_total{engine=1}'] > 0
        texts = [_pinned(base, rank).json()["choices"][0]["message"]["content"] for rank in (0, 1)]
        assert texts[0] == texts[1] and texts[0]
        for bad in ("2", "-1", "one"):
            response = _pinned(base, bad)
            assert response.status_code == 400 and "X-data-parallel-rank" in response.json()["error"]["message"]

        victim = _core_pids(base)[1]
        events = _stream_until_error(base, 1, lambda: os.kill(victim, signal.SIGKILL))
        assert "engine core 1 died" in events[-2] and events[-1] == "[DONE]"
        _until_both_api_servers_report_503(base)  # the other front notices between its steps
        for _ in range(4):  # new connections: either API server process
            health = httpx.get(f"{base}/health", timeout=10)
            assert health.status_code == 503 and "engine core 1 died" in health.json()["error"]["message"]
            assert _pinned(base, 0).status_code == 200  # the survivor serves on
            assert httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=120).status_code == 200
            assert _pinned(base, 1).status_code == 503
            assert metric_sum(scrape(base), "graphmode:engine_alive") == 1


def test_a_headless_node_runs_rank_1_and_a_dead_core_stops_the_server():
    port = free_port()
    dp = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-rpc-port", str(port)]
    headless = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve", "--headless", *dp, "--data-parallel-start-rank", "1",
         "--max-num-seqs", "8", "--max-model-len", "512", "--num-kv-blocks", "256"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        with running_server(*dp, exit_code=1) as base:
            texts = [_pinned(base, rank).json()["choices"][0]["message"]["content"] for rank in (0, 1)]
            assert texts[0] == texts[1] and texts[0]
            assert scrape(base)['graphmode:generation_tokens_total{engine=1}'] > 0  # rank 1 ran on the other "node"
            local = _core_pids(base)[0]
            events = _stream_until_error(base, 0, lambda: os.kill(local, signal.SIGKILL))
            assert "engine core 0 died" in events[-2] and events[-1] == "[DONE]"
            assert wait_for_exit(base) == 1  # without --data-parallel-tolerate-failure the server stops
        assert headless.wait(60) == 0, headless.stderr.read()[-3000:]  # the server told its cores to stop
    finally:
        if headless.poll() is None:
            headless.kill()

