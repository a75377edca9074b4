"""Prometheus metrics: engine state read at scrape time, request timings and token counts as they happen.

Each app owns its registry (several servers can live in one process, as in tests). Names follow
vLLM's ``vllm:*`` scheme under ``graphmode:*``. Several API server processes (``--api-server-count``) keep
their counters in prometheus_client's multiprocess files, summed by whichever process is scraped.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineCollector:
    """Engine and compiler state, read when /metrics is scraped."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self):
        per_engine = self.engine.stats()
        loop_alive = self.engine.is_alive
        gauges = [
            ("graphmode:num_requests_running", "Requests (sequences) in the running batch.", "num_running"),
            ("graphmode:num_requests_waiting", "Requests (sequences) waiting to be scheduled.", "num_waiting"),
            ("graphmode:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", "kv_usage"),
            ("graphmode:kv_cache_used_blocks", "KV cache blocks in use.", "kv_used_blocks"),
            ("graphmode:kv_cache_total_blocks", "KV cache blocks in total.", "kv_total_blocks"),
            ("graphmode:prefix_cache_hit_rate", "Prefix cache hits per query block since start (0-1).",
             "prefix_cache_hit_rate"),
            ("graphmode:engine_alive", "1 while the engine loop and this engine core run.", "alive"),
        ]
        totals = [
            ("graphmode:engine_steps", "Engine steps (model forwards) run.", "num_steps"),
            ("graphmode:graph_replays", "Static device graph replays (rank 0's under tensor parallelism).",
             "graph_replays"),
            ("graphmode:eager_steps", "Forwards run eagerly although graphs were enabled.", "eager_steps"),
            ("graphmode:prompt_tokens_computed", "Prompt tokens run through the model (not served from the prefix "
             "cache or a prefill instance's KV).", "prompt_tokens_computed"),
        ]
        for family, rows in ((GaugeMetricFamily, gauges), (CounterMetricFamily, totals)):
            for name, doc, field in rows:
                metric = family(name, doc, labels=["engine"])
                for index, stats in enumerate(per_engine):
                    value = getattr(stats, field)
                    metric.add_metric([str(index)], float(value and loop_alive) if field == "alive" else value)
                yield metric
        transfer = CounterMetricFamily("graphmode:kv_transfer_tokens", "Prompt tokens whose KV went to a decode "
                                       "instance (sent) or came from a prefill instance (received).",
                                       labels=["engine", "direction"])
        for index, stats in enumerate(per_engine):
            transfer.add_metric([str(index), "sent"], stats.kv_sent_tokens)
            transfer.add_metric([str(index), "received"], stats.kv_received_tokens)
        yield transfer


class ServerMetrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = r = CollectorRegistry()
        # Per engine core (data parallelism): the engine label, as vLLM's.
        self.prompt_tokens = Counter("graphmode:prompt_tokens", "Prompt tokens of requests that started generating.",
                                     ["engine"], registry=r)
        self.generation_tokens = Counter("graphmode:generation_tokens", "Tokens generated.", ["engine"], registry=r)
        self.request_success = Counter("graphmode:request_success", "Requests finished, by finish reason.",
                                       ["finished_reason"], registry=r)
        self.request_abort = Counter("graphmode:request_abort",
                                     "Requests ended before finishing (client disconnect, shutdown, error).",
                                     registry=r)
        self.http_responses = Counter("graphmode:http_responses", "HTTP responses by status class.", ["status"],
                                      registry=r)
        self.ttft = Histogram("graphmode:time_to_first_token_seconds", "Time to first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("graphmode:time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("graphmode:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        self._engine_collector = _EngineCollector(engine)
        r.register(self._engine_collector)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several API server processes: their counters summed
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            registry.register(self._engine_collector)
            return generate_latest(registry)
        return generate_latest(self.registry)

    async def track(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Passes one request's outputs through, counting tokens as they come and timings at the end."""
        generated, first_seen, last = 0, False, None
        async with contextlib.aclosing(outputs) as stream:
            try:
                async for out in stream:
                    last = out
                    count = sum(len(c.token_ids) for c in out.outputs)
                    engine = str(out.engine_index)
                    if count > generated:
                        self.generation_tokens.labels(engine=engine).inc(count - generated)
                        generated = count
                    if not first_seen and out.metrics.ttft is not None:
                        first_seen = True
                        self.ttft.observe(out.metrics.ttft)
                        self.prompt_tokens.labels(engine=engine).inc(len(out.prompt_token_ids))
                    yield out
            finally:
                self._finish(last)

    def _finish(self, out: RequestOutput | None) -> None:
        if out is None or not out.finished or any(c.finish_reason == "abort" for c in out.outputs):
            self.request_abort.inc()
            return
        self.request_success.labels(finished_reason=out.outputs[0].finish_reason).inc()
        m = out.metrics
        if m.finished_time is not None:
            self.e2e.observe(max(0.0, m.finished_time - m.arrival_time))
            longest = max(len(c.token_ids) for c in out.outputs)
            if m.first_token_time is not None and longest > 1:
                self.tpot.observe(max(0.0, m.finished_time - m.first_token_time) / (longest - 1))


class StatusCountingMiddleware:
    """Counts every HTTP response by status class (2xx, 4xx, 5xx), errors from other middleware included."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.http_responses.labels(status=f"{message['status'] // 100}xx").inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:  # the outermost error middleware answers 500 for it
                self.metrics.http_responses.labels(status="5xx").inc()
            raise
