"""`python -m runtime.bench disagg`: prefill/decode disaggregation against one instance, on the same device(s).

It starts the servers itself, one set after the other: first one plain instance with ``--kv-cache-memory-gb``,
then a prefill instance (``kv_producer``) and a decode instance (``kv_consumer``) with half of it each and the
disaggregation proxy in front of them, and runs ``runtime.bench serving``'s workload against each (decode streams
measured while long prompts arrive). Rows ``one_instance`` and ``disaggregated``; every server's log is kept
under ``--log-dir``, and a server that fails to start is an error quoting its log's end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Iterator

from runtime.bench.engines import RANDOM_MODELS, checkpoint_path
from runtime.bench.results import ResultTable
from runtime.bench.serving import add_workload_arguments, check_workload, failed, measure
from runtime.engine.processes import free_port

SERVED_NAME = "bench"
START_TIMEOUT_S = 600.0


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("disagg", parents=parents,
                       help="prefill/decode disaggregation vs one instance: decode streams' inter-token latency")
    s.add_argument("--model", default=None,
                   help=f"checkpoint dir or .gguf, or one of {', '.join(RANDOM_MODELS)} (random weights, written once "
                        "as a checkpoint; no tokenizer, so --logprobs is implied) (default: the embedded SmolLM2)")
    s.add_argument("--dtype", default="auto", help="(default: %(default)s)")
    s.add_argument("--max-model-len", type=int, default=4096, help="(default: %(default)s)")
    s.add_argument("--kv-cache-memory-gb", type=float, required=True,
                   help="the one instance's KV cache; the prefill and the decode instance get half each")
    s.add_argument("--server-args", default="", help="more runtime.serve flags for every instance, one string")
    s.add_argument("--log-dir", default=None, help="where the servers' logs go (default: a temporary directory)")
    add_workload_arguments(s)
    s.add_argument("--json", default=None, help="write results to this file (rewritten as each setup finishes)")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _tail(path: str, lines: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


@contextlib.contextmanager
def _processes(commands: dict[str, list[str]], log_dir: str) -> Iterator[dict[str, str]]:
    """Each command started with its log in ``log_dir``; yields {name: base URL} once all are healthy, and
    stops them all (SIGTERM, then SIGKILL after 30 s) however the block ends."""
    procs: dict[str, tuple[subprocess.Popen, str, str]] = {}
    try:
        for name, (url, command) in _with_urls(commands).items():
            log = os.path.join(log_dir, f"{name}.log")
            with open(log, "w") as out:
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            procs[name] = (proc, url, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        for name, (proc, url, log) in procs.items():
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = f"exited with {proc.returncode}" if proc.poll() is not None else "is not healthy in time"
                    raise ValueError(f"{name} ({url}) {why}; the end of {log}:\n{_tail(log)}")
                time.sleep(0.5)
        yield {name: url for name, (_, url, _) in procs.items()}
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _with_urls(commands: dict[str, list[str]]) -> dict[str, tuple[str, list[str]]]:
    """Each command's "{port}" filled with a free port, with the URL it will answer on."""
    out = {}
    for name, command in commands.items():
        port = free_port()
        out[name] = (f"http://127.0.0.1:{port}", [a.replace("{port}", str(port)) for a in command])
    return out


def _server(args: argparse.Namespace, kv_gb: float, *extra: str) -> list[str]:
    model = ["--model", args.model] if args.model else []
    return [sys.executable, "-m", "runtime.serve", *model, "--served-model-name", SERVED_NAME, "--dtype", args.dtype,
            "--max-model-len", str(args.max_model_len), "--kv-cache-memory-gb", str(kv_gb), "--host", "127.0.0.1",
            "--port", "{port}", "--no-access-log", *shlex.split(args.server_args), *extra]


def _consumer_counts(url: str) -> dict[str, float]:
    """The decode instance's prompt tokens computed and prompt tokens whose KV it received."""
    from prometheus_client.parser import text_string_to_metric_families  # the serving extra's

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {"prompt_tokens_computed": 0.0, "kv_tokens_received": 0.0}
    for sample in (s for family in text_string_to_metric_families(text) for s in family.samples):
        if sample.name == "graphmode:prompt_tokens_computed_total":
            counts["prompt_tokens_computed"] += sample.value
        elif sample.name == "graphmode:kv_transfer_tokens_total" and sample.labels.get("direction") == "received":
            counts["kv_tokens_received"] += sample.value
    return counts


def bench_disagg(args: argparse.Namespace, table: ResultTable) -> None:
    check_workload(args)
    args.served_model_name = SERVED_NAME
    if args.model in RANDOM_MODELS:
        args.model, args.logprobs = checkpoint_path(args), True
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="graphmode-disagg-")
    os.makedirs(log_dir, exist_ok=True)
    with _processes({"one_instance": _server(args, args.kv_cache_memory_gb)}, log_dir) as urls:
        rows, errors = measure(args, urls["one_instance"], "one_instance")
    table.add(*rows)
    if errors:
        raise failed(errors)
    kv_port = free_port()
    half = args.kv_cache_memory_gb / 2
    producer = json.dumps({"kv_role": "kv_producer", "kv_port": kv_port})
    setup = {"producer": _server(args, half, "--kv-transfer-config", producer),
             "consumer": _server(args, half, "--kv-transfer-config", '{"kv_role": "kv_consumer"}')}
    with _processes(setup, log_dir) as urls:
        proxy = [sys.executable, "-m", "runtime.serve.disagg_proxy", "--port", "{port}", "--prefill",
                 urls["producer"], "--decode", urls["consumer"]]
        with _processes({"proxy": proxy}, log_dir) as front:
            rows, errors = measure(args, front["proxy"], "disaggregated")
        counts = _consumer_counts(urls["consumer"])
    table.add(*rows)
    print(f"decode instance: {counts['kv_tokens_received']:.0f} prompt tokens' KV received, "
          f"{counts['prompt_tokens_computed']:.0f} prompt tokens computed; logs in {log_dir}", flush=True)
    if errors:
        raise failed(errors)
