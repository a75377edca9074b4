"""Runs the real ``python -m runtime.serve`` as a subprocess on a free loopback port for the server tests."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import REPO_ROOT

SMALL_CONFIG = ("--max-num-seqs", "8", "--max-model-len", "512", "--num-kv-blocks", "256")
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 240.0  # load + warm-up take ~20 s on the 2-core CI machine; generous for a busy one
SHUTDOWN_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.2

_PROCESSES: dict[str, subprocess.Popen] = {}  # base URL -> server process, for tests that signal it
_LOGS: dict[str, str] = {}  # base URL -> its log file, for tests that read what the server logged


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _wait_healthy(proc: subprocess.Popen, base_url: str, log_path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} during start-up:\n{_tail(log_path)}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass  # the port is not open yet: the engine is still loading
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(POLL_INTERVAL_S)  # paces the poll and notices an early exit at once
    raise AssertionError(f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen, log_path: str) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server ignored SIGTERM for {SHUTDOWN_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")
    return proc.returncode


@contextlib.contextmanager
def running_server(*extra_args: str, env: dict[str, str] | None = None, exit_code: int = 0) -> Iterator[str]:
    """Yields the base URL of a healthy server; on exit sends SIGTERM (if it still runs) and asserts ``exit_code``."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w", prefix="graphmode-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "runtime.serve", "--host", "127.0.0.1", "--port", str(port), *SMALL_CONFIG,
           "--no-access-log", *extra_args]
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    _PROCESSES[base_url] = proc
    _LOGS[base_url] = log.name
    try:
        _wait_healthy(proc, base_url, log.name)
        yield base_url
    except BaseException:
        _stop(proc, log.name)
        raise
    finally:
        log.close()
        _PROCESSES.pop(base_url, None)
        _LOGS.pop(base_url, None)
    code = _stop(proc, log.name)
    assert code == exit_code, f"server exited with {code}, not {exit_code}:\n{_tail(log.name)}"
    assert "Traceback" not in _tail(log.name, 10**7), f"server logged a traceback:\n{_tail(log.name)}"
    os.unlink(log.name)


def signal_server(base_url: str, sig: int = signal.SIGTERM) -> subprocess.Popen:
    """Signals a server started by ``running_server`` (its exit code is still checked when the block ends)."""
    proc = _PROCESSES[base_url]
    proc.send_signal(sig)
    return proc


def server_process(base_url: str) -> subprocess.Popen:
    """The process of a server started by ``running_server`` (to kill it outright)."""
    return _PROCESSES[base_url]


def wait_for_exit(base_url: str, timeout: float = SHUTDOWN_TIMEOUT_S) -> int:
    """The exit code of a server started by ``running_server`` that stops on its own."""
    return _PROCESSES[base_url].wait(timeout)


def server_log(base_url: str) -> str:
    """What a server started by ``running_server`` has logged so far."""
    return _tail(_LOGS[base_url], 10**7)


def scrape(base_url: str) -> dict[str, float]:
    """/metrics as {sample name with labels: value}, e.g. 'graphmode:request_success_total{finished_reason=stop}'."""
    text = httpx.get(f"{base_url}/metrics", timeout=10.0).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    """Sum of a sample over all its label sets."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))
