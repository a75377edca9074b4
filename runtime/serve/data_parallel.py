"""The server's side of data parallelism: where the engine cores run, a ``--headless`` host's launcher, and
several API server processes (``--api-server-count``), each its own front to every engine core.

API server ``i`` listens on the server's port too (SO_REUSEPORT: the kernel spreads the connections) and
talks to the cores through front ``i`` (runtime/engine/dp_client.py). The first process starts this
host's cores and the other API servers, and stops them all; request counters are shared through
prometheus_client's multiprocess mode, so /metrics reads the same from any of them.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
from typing import Any, Callable

logger = logging.getLogger("runtime.serve")

PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when first imported


def uses_engine_core_processes(args: argparse.Namespace) -> bool:
    """The engine cores run in processes of their own, behind the data-parallel client."""
    return args.data_parallel_size > 1 or args.api_server_count > 1


def placement_from_args(args: argparse.Namespace):
    from runtime.engine.dp_client import DataParallelPlacement

    local = args.data_parallel_size if args.data_parallel_size_local is None else args.data_parallel_size_local
    if local < 0:
        raise ValueError(f"--data-parallel-size-local must be >= 0, got {local}")
    start = args.data_parallel_start_rank
    placement = DataParallelPlacement(args.data_parallel_size, range(start, start + local), args.data_parallel_address,
                                      args.data_parallel_rpc_port, args.api_server_count)
    if not args.headless and placement.local_ranks and placement.local_ranks.start != 0:
        raise ValueError("the server's host runs data-parallel rank 0 (--data-parallel-start-rank 0); other hosts "
                         "run theirs with --headless")
    return placement


def share_metrics_between_processes() -> str:
    """Before prometheus_client is imported: counters kept in files every API server process adds to."""
    directory = tempfile.mkdtemp(prefix="graphmode-metrics-")
    os.environ[PROMETHEUS_DIR_ENV] = directory
    return directory


def forget_shared_metrics(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def start_api_servers(target: Callable[[list[str], int, Any], int], argv: list[str],
                      placement: Any) -> list[mp.Process]:
    """API servers 1..count-1, each ``target(argv, index, placement)`` (the server's run for front ``index``,
    a module-level function: a spawned process imports it by name) in a process of its own."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited engine, event loop or sockets
    procs = []
    for index in range(1, placement.num_fronts):
        proc = ctx.Process(target=_exit_with, args=(target, argv, index, placement), name=f"graphmode-api{index}",
                           daemon=True)
        proc.start()
        procs.append(proc)
    return procs


def _exit_with(target: Callable[..., int], *args: Any) -> None:
    sys.exit(target(*args))


def stop_api_servers(procs: list[mp.Process], grace_s: float) -> None:
    from runtime.engine.processes import join_or_kill

    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: the API server shuts down as on a user's signal
    join_or_kill(procs, grace_s)


def run_headless(args: argparse.Namespace, config: Any) -> int:
    """This host's engine cores only: they connect to the server's fronts and run until it stops them."""
    from runtime.engine.dp_client import start_engine_cores

    placement = placement_from_args(args)
    if placement.rpc_port is None:
        raise ValueError("--headless needs --data-parallel-rpc-port (the server's) and --data-parallel-address")
    if not placement.local_ranks:
        raise ValueError("--headless with no engine cores to run: set --data-parallel-size-local")
    procs = start_engine_cores(config, placement.local_ranks, placement.front_addresses(), headless=True)
    logger.info("headless: engine cores %d..%d started, serving the front(s) at %s:%s", placement.local_ranks.start,
                placement.local_ranks.stop - 1, placement.address, ",".join(map(str, placement.front_ports)))

    def stop(signum, frame) -> None:
        for proc in procs:
            proc.terminate()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for proc in procs:
        proc.join()
    failed = [p.name for p in procs if p.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        logger.error("engine cores ended with an error: %s", ", ".join(failed))
    return 1 if failed else 0
