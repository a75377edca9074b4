"""SIGTERM while the engine is inside one long step (a long prefill): every request in flight ends with the
OpenAI error shape or an error event + [DONE] at once, and the process exits 0 once the step is over."""
from __future__ import annotations

import json
import threading

import httpx

from tests.helpers.serve import metric_sum, running_server, scrape, signal_server

# One step prefills the whole prompt: seconds on the 2-core CI machine, longer than a poll.
LONG = ("--max-model-len", "2048", "--max-num-batched-tokens", "2048")
PROMPT = list(range(1000, 3040))  # 2,040 token ids
EXIT_TIMEOUT_S = 40


def test_sigterm_during_a_long_prefill_ends_every_request_and_exits_0():
    results: dict[str, object] = {}
    with running_server(*LONG) as base:
        def non_streaming() -> None:
            results["plain"] = httpx.post(f"{base}/v1/completions", timeout=120.0,
                                          json={"prompt": PROMPT, "max_tokens": 4})

        def streaming() -> None:
            with httpx.stream("POST", f"{base}/v1/completions", timeout=120.0,
                              json={"prompt": PROMPT, "max_tokens": 4, "stream": True}) as r:
                results["stream"] = (r.status_code, [line for line in r.iter_lines() if line])

        threads = [threading.Thread(target=f) for f in (non_streaming, streaming)]
        for t in threads:
            t.start()
        while metric_sum(scrape(base), "graphmode:num_requests_running") < 1:  # the long step has started
            assert all(t.is_alive() for t in threads), "a request ended before the step started"
        proc = signal_server(base)
        for t in threads:
            t.join(EXIT_TIMEOUT_S)
        proc.wait(EXIT_TIMEOUT_S)  # running_server then asserts exit code 0 and no traceback in the log
    plain = results["plain"]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "engine_unavailable"
    status, lines = results["stream"]
    if status == 200:  # the stream had started: an error event, then [DONE]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "engine_unavailable"
    else:
        assert status == 503 and json.loads(lines[0])["error"]["code"] == "engine_unavailable"
