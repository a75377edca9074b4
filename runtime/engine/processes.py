"""Helpers for the processes an engine starts (tensor-parallel workers, data-parallel engine cores)."""
from __future__ import annotations

import multiprocessing as mp
import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS's pick): a rendezvous for processes started next."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join_or_kill(procs: list[mp.Process], grace_s: float) -> None:
    """Wait up to ``grace_s`` for processes already asked to stop, then terminate, then kill (a process stuck
    in a collective ignores every request)."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(1.0)
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
