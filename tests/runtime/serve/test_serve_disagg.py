"""Prefill/decode disaggregation on CPU (SmolLM2): a kv_producer server, a kv_consumer server and the proxy,
three processes. Through the proxy the tokens are exactly the plain server's, the decode instance computes
one prompt token per request (the rest of the prompt's KV comes from the producer); with the producer
killed, between prefill and decode or before the proxy reaches it, requests still complete with the same
tokens (the consumer computes the prompts itself) and no KV block stays held.
"""
import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time

import httpx

from tests.helpers import REPO_ROOT
from tests.helpers.serve import free_port, metric_sum, running_server, scrape, server_log, server_process, wait_for_exit

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


async def _complete_all(base: str, prompts: list[list[int]]) -> list[str]:
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(prompt):
            body = {**GREEDY, "prompt": prompt}
            return (await client.post(f"{base}/v1/completions", json=body)).json()["choices"][0]["text"]
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

        # The producer dies after prefilling: the consumer cannot fetch the KV and computes the prompts itself.
        params = [httpx.post(f"{prefill}/v1/completions", timeout=120, json={
            **GREEDY, "prompt": p, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        ).json()["kv_transfer_params"] for p in prompts[:4]]
        server_process(prefill).kill()
        assert wait_for_exit(prefill) == -signal.SIGKILL
        fetched_too_late = [httpx.post(f"{decode}/v1/completions", timeout=120, json={
            **GREEDY, "prompt": p, "kv_transfer_params": kv}).json()["choices"][0]["text"]
            for p, kv in zip(prompts[:4], params)]
        assert fetched_too_late == plain[:4]
        assert server_log(decode).count("computing its prompt here") == 4
        # ... and the proxy, its prefill instance gone, sends the requests straight to the decode instance.
        assert asyncio.run(_complete_all(proxy, prompts[4:8])) == plain[4:8]
        left = scrape(decode)
        assert metric_sum(left, "graphmode:kv_cache_used_blocks") == 0
        assert metric_sum(left, "graphmode:num_requests_running") == 0
