"""`python -m runtime.bench serving`: inter-token latency of streaming decodes while long prompts arrive.

A client of a running OpenAI-compatible server (ours, or the disaggregation proxy in front of a prefill and a
decode instance). ``--decode-streams`` requests with short prompts stream long completions; once they are all
generating, ``--long-prompts`` requests of ``--long-prompt-len`` tokens arrive ``--long-interval-s`` apart,
each generating a few tokens. The decode streams' inter-token latency (the gaps between stream events after
the first) shows what the long prompts' prefill costs them: on one instance the prefill shares their steps,
disaggregated it runs elsewhere. Prompts are random token ids (``--vocab-size`` bounds them; no tokenizer
needed), EOS is ignored, greedy. One row per request kind.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from runtime.bench.results import ResultTable

SERVING_COLUMNS = ("config", "kind", "requests", "failed", "output_tokens", "ttft_p50_ms", "ttft_p99_ms",
                   "itl_p50_ms", "itl_p99_ms", "itl_max_ms", "seconds")


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serving", parents=parents,
                       help="a running server: decode streams' inter-token latency while long prompts arrive")
    s.add_argument("--url", required=True, help="the server's (or the proxy's) base URL, e.g. http://127.0.0.1:8000")
    s.add_argument("--label", default="server", help="the config column's value for this run (default: %(default)s)")
    s.add_argument("--served-model-name", default=None, help="the request's model field (default: the server's first)")
    add_workload_arguments(s)
    s.add_argument("--json", default=None, help="write results to this file")


def add_workload_arguments(s: argparse.ArgumentParser) -> None:
    """The decode streams and the long prompts (shared with ``runtime.bench disagg``)."""
    s.add_argument("--vocab-size", type=int, default=32000,
                   help="prompt token ids are drawn from [100, this) (default: %(default)s)")
    s.add_argument("--decode-streams", type=int, default=16, help="streaming decodes measured (default: %(default)s)")
    s.add_argument("--decode-prompt-len", type=int, default=64, help="their prompt tokens (default: %(default)s)")
    s.add_argument("--decode-output-len", type=int, default=256, help="their output tokens (default: %(default)s)")
    s.add_argument("--long-prompts", type=int, default=8, help="long-prompt requests (default: %(default)s)")
    s.add_argument("--long-prompt-len", type=int, default=2048, help="their prompt tokens (default: %(default)s)")
    s.add_argument("--long-output-len", type=int, default=8, help="their output tokens (default: %(default)s)")
    s.add_argument("--long-interval-s", type=float, default=0.5,
                   help="seconds between long prompts' arrivals (default: %(default)s)")
    s.add_argument("--logprobs", action="store_true",
                   help="ask for each sampled token's log-prob (logprobs=0): the server then sends an event per token "
                        "even where the text does not grow (a checkpoint without a tokenizer)")
    s.add_argument("--seed", type=int, default=0, help="the prompts' random seed (default: %(default)s)")
    s.add_argument("--timeout-s", type=float, default=600.0, help="per request (default: %(default)s)")


@dataclass
class StreamTimes:
    """One streamed request: when it was sent, when each event with tokens came, how many tokens."""
    sent: float
    events: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


async def _stream(client: Any, url: str, body: dict[str, Any], times: StreamTimes) -> None:
    """Send ``body`` streamed; note in ``times`` when each event with choices comes and the tokens counted."""
    times.sent = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                times.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    times.error = str(event["error"])[:200]
                if event.get("choices"):  # the last event, usage alone, has none
                    times.events.append(time.perf_counter())
                if event.get("usage"):
                    times.tokens = event["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 (a transport error is this request's failure, reported in its row)
        times.error = f"{type(e).__name__}: {e}"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(config: str, kind: str, runs: list[StreamTimes], seconds: float) -> dict[str, Any]:
    """A row: time to the first event and the gaps between later events, over the successful requests."""
    ok = [r for r in runs if r.error is None and r.events]
    ttft = [1e3 * (r.events[0] - r.sent) for r in ok]
    itl = [1e3 * (b - a) for r in ok for a, b in zip(r.events, r.events[1:])]
    return {"config": config, "kind": kind, "requests": len(runs), "failed": len(runs) - len(ok),
            "output_tokens": sum(r.tokens for r in ok), "ttft_p50_ms": _percentile(ttft, 50),
            "ttft_p99_ms": _percentile(ttft, 99), "itl_p50_ms": statistics.median(itl) if itl else None,
            "itl_p99_ms": _percentile(itl, 99), "itl_max_ms": max(itl) if itl else None, "seconds": seconds}


async def _model_name(client: Any, url: str) -> str:
    response = await client.get(f"{url}/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run_workload(args: argparse.Namespace, url: str) -> tuple[list[StreamTimes], list[StreamTimes], float]:
    """(decode streams, long prompts, seconds): the decodes start together; the long prompts follow once the
    decodes have each produced a token, one every --long-interval-s."""
    import httpx  # the serving extra's client; only this subcommand needs it

    rng = random.Random(args.seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, args.vocab_size) for _ in range(n)]

    async with httpx.AsyncClient(timeout=args.timeout_s, limits=httpx.Limits(max_connections=None)) as client:
        model = args.served_model_name or await _model_name(client, url)
        common = {"model": model, "temperature": 0, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}, **({"logprobs": 0} if args.logprobs else {})}
        decode_bodies = [{**common, "prompt": prompt(args.decode_prompt_len), "max_tokens": args.decode_output_len}
                         for _ in range(args.decode_streams)]
        long_bodies = [{**common, "prompt": prompt(args.long_prompt_len), "max_tokens": args.long_output_len}
                       for _ in range(args.long_prompts)]
        start = time.perf_counter()
        decode_runs = [StreamTimes(start) for _ in decode_bodies]
        long_runs = [StreamTimes(start) for _ in long_bodies]
        tasks = [asyncio.create_task(_stream(client, url, b, t)) for b, t in zip(decode_bodies, decode_runs)]
        while not all(r.events or task.done() for r, task in zip(decode_runs, tasks)):  # all generating first
            await asyncio.sleep(0.005)
        for i, (body, times) in enumerate(zip(long_bodies, long_runs)):
            if i:
                await asyncio.sleep(args.long_interval_s)
            tasks.append(asyncio.create_task(_stream(client, url, body, times)))
        await asyncio.gather(*tasks)
        return decode_runs, long_runs, time.perf_counter() - start


def measure(args: argparse.Namespace, url: str, label: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The workload against ``url``: (a row for the decode streams and one for the long prompts, the failed
    requests' errors)."""
    decode_runs, long_runs, seconds = asyncio.run(run_workload(args, url))
    rows = [summarize(label, "decode", decode_runs, seconds)]
    if long_runs:
        rows.append(summarize(label, "long_prompt", long_runs, seconds))
    return rows, [r.error for r in decode_runs + long_runs if r.error]


def check_workload(args: argparse.Namespace) -> None:
    if args.decode_streams < 1 or args.long_prompts < 0:
        raise ValueError("--decode-streams must be >= 1 and --long-prompts >= 0")


def failed(errors: list[str]) -> ValueError:
    return ValueError(f"{len(errors)} requests failed; the first: {errors[0]}")


def bench_serving(args: argparse.Namespace, table: ResultTable) -> None:
    check_workload(args)
    rows, errors = measure(args, args.url, args.label)
    table.add(*rows)
    if errors:
        raise failed(errors)
