"""Prefill/decode disaggregation on CPU (SmolLM2): a kv_producer server, a kv_consumer server and the proxy,
three processes. Through the proxy the tokens are exactly the plain server's, the decode instance computes
one prompt token per request (the rest of the prompt's KV comes from the producer); with the producer
killed, requests still complete (the consumer computes the prompts itself) and no KV block stays held.
"""
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import httpx

from tests.helpers import REPO_ROOT
from tests.helpers.serve import free_port, metric_sum, running_server, scrape, server_log

GREEDY = {"model": "SmolLM2-135M-Instruct", "max_tokens": 6, "temperature": 0}


@contextlib.contextmanager
def _proxy(prefill: str, decode: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve.disagg_proxy", "--port", str(port), "--prefill",
                             prefill, "--decode", decode, "--log-level", "warning"], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, \
                proc.stderr.read()[-3000:] if proc.poll() is not None else "the proxy is not healthy"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


async def _complete_all(base: str, prompts: list[list[int]], stream: bool = False) -> list[list[str]]:
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(prompt):
            body = {**GREEDY, "prompt": prompt, "stream": stream, "max_tokens": 24 if stream else 6}
            if not stream:
                return (await client.post(f"{base}/v1/completions", json=body)).json()["choices"][0]["text"]
            async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
                assert response.status_code == 200
                return [line async for line in response.aiter_lines() if line.startswith("data: ")]
        return await asyncio.gather(*map(one, prompts))


def test_prefill_on_one_instance_decode_on_another_through_the_proxy():
    rng = random.Random(0)
    prompts = [[rng.randint(100, 20000) for _ in range(rng.randint(10, 300))] for _ in range(16)]
    kv_port = free_port()
    producer = ("--kv-transfer-config", f'{{"kv_role": "kv_producer", "kv_port": {kv_port}}}')
    consumer = ("--kv-transfer-config", '{"kv_role": "kv_consumer", "transfer_timeout_s": 5}')
    with running_server(*producer, exit_code=-signal.SIGKILL) as prefill, running_server(*consumer) as decode, \
            _proxy(prefill, decode) as proxy:
        plain = asyncio.run(_complete_all(decode, prompts))  # the consumer as a plain server: no params
        before = scrape(decode)
        disaggregated = asyncio.run(_complete_all(proxy, prompts))
        after = scrape(decode)
        assert disaggregated == plain
        computed = after["graphmode:prompt_tokens_computed_total{engine=0}"] - \
            before["graphmode:prompt_tokens_computed_total{engine=0}"]
        received = after["graphmode:kv_transfer_tokens_total{direction=received,engine=0}"] - \
            before["graphmode:kv_transfer_tokens_total{direction=received,engine=0}"]
        assert computed <= len(prompts) and received == sum(map(len, prompts))
        sent = scrape(prefill)
        assert sent["graphmode:kv_transfer_tokens_total{direction=sent,engine=0}"] == received
        assert metric_sum(sent, "graphmode:kv_cache_used_blocks") == 0  # nothing held for a transfer

        # The producer dies while requests stream through the proxy: they complete all the same.
        pid = int(server_log(prefill).split("Started server process [")[1].split("]")[0])
        killer = asyncio.get_event_loop_policy().new_event_loop()
        streams = killer.run_until_complete(_kill_during(pid, proxy, prompts[:8]))
        killer.close()
        assert all(events[-1] == "data: [DONE]" and '"error"' not in "".join(events) for events in streams)
        left = scrape(decode)
        assert metric_sum(left, "graphmode:kv_cache_used_blocks") == 0
        assert metric_sum(left, "graphmode:num_requests_running") == 0
        # The consumer computed (most of) those prompts itself: no producer was left to send their KV.
        recomputed = left["graphmode:prompt_tokens_computed_total{engine=0}"] - \
            after["graphmode:prompt_tokens_computed_total{engine=0}"]
        assert recomputed > 8


async def _kill_during(pid: int, proxy: str, prompts: list[list[int]]) -> list[list[str]]:
    task = asyncio.ensure_future(_complete_all(proxy, prompts, stream=True))
    await asyncio.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    return await task
