"""``DataParallelClient``: N engine cores, each a process with its own device(s) and KV cache, behind one front.

It answers the calls ``EngineCore`` answers (``add_request``, ``step``, ``abort_request``, ``stats``...), so
``AsyncEngine`` (the server) and ``LLM`` (offline) drive it unchanged. The front binds one ZMQ ROUTER
socket; every core (runtime/engine/core_process.py) connects to it, from this host or another one (a
``--headless`` launcher). A request goes to the core with the least load (4 x waiting + running, from the
figures the cores publish, plus what was sent since), as vLLM's internal data-parallel load balancing
does, or to the core it is pinned to. A core that dies fails its requests with ``EngineDeadError``;
unless failures are tolerated, the client then stops (and the server with it).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import socket
import time
import weakref
from typing import Any, Sequence

import zmq

from models.gguf_file import gguf_parsed_once
from runtime.contracts.config import EngineConfig
from runtime.contracts.sampling_params import SamplingParams
from runtime.engine.async_engine import EngineDeadError
from runtime.engine.core_process import EngineCoreSpec, run_engine_core
from runtime.engine.dp_messages import (AbortRequests, AddRequest, CallCore, CallDone, Died, Hello, Outputs, Ping,
                                        Ready, Shutdown, Start, decode_from_core, encode, pack_images)
from runtime.engine.outputs import EngineStats, RequestOutput
from runtime.engine.processes import free_port, join_or_kill
from runtime.engine.served_model import ServedModel
from runtime.platforms import current_platform
from runtime.tracing import ProfilerStateError

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 1800.0  # load + compile + capture on the slowest core
_STEP_POLL_MS = 5  # step() waits this long for news before handing control back (new requests, aborts)
_PING_S = 1.0
_REMOTE_SILENCE_S = 300.0  # a core on another node that says nothing this long is dead (a first compile is slow)
_HEADLESS_FRONT_TIMEOUT_S = 60.0  # a core on another node leaves when its front has been silent this long
_STOP_GRACE_S = 10.0
_WAITING_WEIGHT = 4  # vLLM's internal load balancing: a waiting request weighs four running ones


@dataclasses.dataclass
class DataParallelPlacement:
    """Which ranks this host runs, and where the fronts listen (``--data-parallel-*``, ``--api-server-count``):
    front ``i`` (API server process ``i``) at ``rpc_port + i``."""
    size: int
    local_ranks: range
    address: str = "127.0.0.1"
    rpc_port: int | None = None  # None: free ports (every core on this host)
    num_fronts: int = 1

    def __post_init__(self) -> None:
        if self.rpc_port is None and len(self.local_ranks) < self.size:
            raise ValueError("engine cores on other hosts need a known port: pass --data-parallel-rpc-port")
        if self.local_ranks and (self.local_ranks.start < 0 or self.local_ranks.stop > self.size):
            raise ValueError(f"local ranks {self.local_ranks.start}..{self.local_ranks.stop - 1} are outside "
                             f"data_parallel_size={self.size}")
        if self.num_fronts < 1:
            raise ValueError(f"the API server count must be >= 1, got {self.num_fronts}")
        self.front_ports = ([self.rpc_port + i for i in range(self.num_fronts)] if self.rpc_port is not None
                             else [free_port(self.address) for _ in range(self.num_fronts)])

    def front_addresses(self) -> list[str]:
        return [f"tcp://{self.address}:{port}" for port in self.front_ports]


def start_engine_cores(config: EngineConfig, ranks: range, front_addresses: list[str],
                       headless: bool = False) -> list[mp.Process]:
    """One process per data-parallel rank in ``ranks``, each on the devices the platform gives it."""
    ctx = mp.get_context(current_platform.worker_start_method)
    level = logging.getLogger().getEffectiveLevel()
    procs = []
    for rank in ranks:
        env, sharing = current_platform.data_parallel_placement(rank, config.data_parallel_size,
                                                                config.tensor_parallel_size)
        if sharing > 1 and config.kv_cache_memory_gb is None and config.num_kv_blocks is None:
            # Profiled sizing counts every process's memory on the device as taken: cores profiling at once
            # would each see the others' caches, or none of them.
            raise ValueError(f"{config.data_parallel_size} engine cores share the devices ({sharing} per device): give "
                             "each a fixed KV cache size (kv_cache_memory_gb / --kv-cache-memory-gb, per core)")
        core_config = dataclasses.replace(config, data_parallel_rank=rank)
        spec = EngineCoreSpec(core_config, front_addresses, env, os.getpid(),
                              _HEADLESS_FRONT_TIMEOUT_S if headless else None, level)
        proc = ctx.Process(target=run_engine_core, args=(spec,), name=f"graphmode-dp{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    return procs


class DataParallelClient:
    def __init__(self, config: EngineConfig, placement: DataParallelPlacement | None = None,
                 tolerate_failure: bool = False, front_index: int = 0) -> None:
        """``front_index`` > 0: another API server process's front; the first front starts this host's cores,
        says Start and stops them, the others only talk to them."""
        self.config = config
        self.front_index = front_index
        self.size = config.data_parallel_size
        self.placement = placement = placement or DataParallelPlacement(self.size, range(self.size))
        self.tolerate_failure = tolerate_failure
        with gguf_parsed_once():
            self.served = served = ServedModel.read(config)
        self.model_config, self.tokenizer, self.model_class = served.model_config, served.tokenizer, served.model_class
        self.vocab_size, self.sampling_defaults = served.vocab_size, served.sampling_defaults
        self.input_processor = served.input_processor
        if config.experts_over_data_parallel and front_index == 0 and 0 not in placement.local_ranks:
            raise ValueError("expert parallelism over data-parallel ranks: the server's host runs rank 0, where the "
                             "ranks meet (--data-parallel-size-local >= 1 there)")
        # The cores start before the socket exists: a forked child must not inherit a live ZMQ context. Their
        # DEALER sockets connect once the front binds.
        ranks = placement.local_ranks if front_index == 0 else range(0)
        self._procs = dict(zip(ranks, start_engine_cores(config, ranks, placement.front_addresses())))
        self._open_socket()
        self._owner: dict[str, int] = {}  # request id -> the rank running it
        self._prompts: dict[str, str | None] = {}
        self._failed: list[tuple[str, Exception]] = []
        self._dead: dict[int, str] = {}
        self._same_host_pids: dict[int, int] = {}  # cores on this host that another front started
        self._stats = [EngineStats(0, 0, 0.0, 0, 0, 0.0, 0) for _ in range(self.size)]
        self._sent_since = [0] * self.size  # requests sent since the core's last published load
        self._pending: list[RequestOutput] = []  # outputs that came in while waiting for something else
        self._calls: dict[int, list[CallDone]] = {}
        self._call_ids = itertools.count()
        now = time.monotonic()
        self._last_heard = [now] * self.size
        self._last_ping = now
        try:
            self._start_up(placement.front_ports[front_index])
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up ------------------------------------------------------------------------------
    def _open_socket(self) -> None:
        """This front's ROUTER socket, bound; closed (and this host's cores stopped) when the client goes."""
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._finalizer = weakref.finalize(self, _close, list(self._procs.values()), self._socket, self._context)
        address = self.placement.front_addresses()[self.front_index]
        try:
            self._socket.bind(address)
        except zmq.ZMQError as e:
            self._finalizer()
            raise ValueError(f"cannot listen for engine cores on {address}: {e}") from None

    def _start_up(self, port: int) -> None:
        start = time.monotonic()
        logger.info("data parallelism: %d engine cores (%d started here), front %d at %s:%d", self.size,
                    len(self._procs), self.front_index, self.placement.address, port)
        hello = self._wait_for(Hello, "to connect", start)
        if self.front_index == 0:  # the other fronts wait for the cores this one starts
            master = None
            if self.config.experts_over_data_parallel:  # rank 0 (on this host) hosts the rendezvous
                master = f"tcp://{self.placement.address}:{free_port(self.placement.address)}"
            for rank in hello:
                self._send(rank, Start(master))
        ready = self._wait_for(Ready, "to build their engines", start)
        self.max_model_len = min(r.max_model_len for r in ready.values())
        self.num_kv_blocks = min(r.num_kv_blocks for r in ready.values())
        logger.info("%d engine cores ready in %.1f s: max_model_len=%d, KV cache %d blocks each (fewest)",
                    self.size, time.monotonic() - start, self.max_model_len, self.num_kv_blocks)

    def _wait_for(self, kind: type, what: str, start: float) -> dict[int, Any]:
        got: dict[int, Any] = {}
        while len(got) < self.size:
            if time.monotonic() - start > STARTUP_TIMEOUT_S:
                missing = sorted(set(range(self.size)) - set(got))
                raise TimeoutError(f"engine cores {missing} did not come {what} within {STARTUP_TIMEOUT_S:.0f} s")
            for message in self._receive(200):
                if isinstance(message, Hello) and kind is Hello:
                    logger.info("engine core %d connected: pid %d on %s", message.rank, message.pid, message.host)
                    if message.host == socket.gethostname():
                        self._same_host_pids[message.rank] = message.pid
                if isinstance(message, Died):
                    raise ValueError(f"engine core {message.rank} failed to start: {message.reason}")
                if isinstance(message, kind):
                    got[message.rank] = message
            for rank, proc in self._procs.items():
                if proc.exitcode is not None:
                    raise ValueError(f"engine core {rank} exited during start-up (exit code {proc.exitcode})")
        return got

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    images: Sequence[Any] | None = None, data_parallel_rank: int | None = None,
                    kv_transfer_params: dict | None = None) -> None:
        """Checked here as ``EngineCore.add_request`` checks it (images: by the core, which fails the request
        through ``take_failed_requests``), then sent to the chosen core."""
        if kv_transfer_params:
            raise ValueError("kv_transfer_params is not supported with data parallelism")
        if request_id in self._owner:
            raise ValueError(f"duplicate request id {request_id!r}")
        ids = self.served.prompt_ids(prompt)
        if images:
            self.served.check_takes_images()
        else:
            self.served.check_prompt_length(ids, self.max_model_len)
        rank = self._choose(data_parallel_rank)
        self._send(rank, AddRequest(request_id, ids, params, pack_images(images)))
        self._owner[request_id] = rank
        self._prompts[request_id] = prompt if isinstance(prompt, str) else None
        self._sent_since[rank] += params.n

    def _choose(self, pinned: int | None) -> int:
        if pinned is not None:
            if not 0 <= pinned < self.size:
                raise ValueError(f"data_parallel_rank must be in [0, {self.size}), got {pinned}")
            if pinned in self._dead:
                raise EngineDeadError(f"engine core {pinned} is dead: {self._dead[pinned]}")
            return pinned
        alive = [r for r in range(self.size) if r not in self._dead]
        if not alive:
            raise EngineDeadError("every engine core is dead")

        def load(rank: int) -> int:
            s = self._stats[rank]
            return _WAITING_WEIGHT * (s.num_waiting + self._sent_since[rank]) + s.num_running
        return min(alive, key=load)

    def abort_request(self, request_id: str) -> bool:
        rank = self._owner.pop(request_id, None)
        self._prompts.pop(request_id, None)
        if rank is None:
            return False
        if rank not in self._dead:
            self._send(rank, AbortRequests([request_id]))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        return self.served.default_sampling_params(**overrides)

    # ---- stepping ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """What the cores sent since the last call (waiting a few ms for it); the cores step on their own."""
        self._ping_if_due()
        outputs, self._pending = self._pending, []
        for message in self._receive(0 if outputs else _STEP_POLL_MS):
            self._handle(message, outputs)
        self._check_cores()
        return outputs

    def take_failed_requests(self) -> list[tuple[str, Exception]]:
        failed, self._failed = self._failed, []
        return failed

    def check_health(self) -> None:
        """While idle: heartbeats and news of dead cores (raises EngineDeadError unless tolerated)."""
        self._ping_if_due()
        for message in self._receive(0):
            self._handle(message, self._pending)
        self._check_cores()

    def _handle(self, message: Any, outputs: list[RequestOutput]) -> None:
        if isinstance(message, Outputs):
            rank = message.rank
            self._stats[rank], self._sent_since[rank] = message.stats, 0
            for out in message.outputs:
                if self._owner.get(out.request_id) != rank:
                    continue  # aborted here after the core sent it
                out.engine_index, out.prompt = rank, self._prompts.get(out.request_id)
                if out.finished:
                    del self._owner[out.request_id], self._prompts[out.request_id]
                outputs.append(out)
            for request_id, reason in message.failed:
                if self._owner.pop(request_id, None) is not None:
                    self._prompts.pop(request_id, None)
                    self._failed.append((request_id, ValueError(reason)))
        elif isinstance(message, CallDone):
            self._calls.setdefault(message.call_id, []).append(message)
        elif isinstance(message, Died):
            self._core_died(message.rank, message.reason)

    def _check_cores(self) -> None:
        now = time.monotonic()
        for rank in range(self.size):
            if rank in self._dead:
                continue
            proc = self._procs.get(rank)
            if proc is not None and proc.exitcode is not None:
                self._core_died(rank, f"its process exited with code {proc.exitcode}")
            elif proc is None and rank in self._same_host_pids and not _process_exists(self._same_host_pids[rank]):
                self._core_died(rank, "its process is gone")  # started by another API server's front
            elif proc is None and now - self._last_heard[rank] > _REMOTE_SILENCE_S:
                self._core_died(rank, f"silent for {now - self._last_heard[rank]:.0f} s")

    def _core_died(self, rank: int, reason: str) -> None:
        if rank in self._dead:
            return
        self._dead[rank] = reason
        self._stats[rank] = dataclasses.replace(self._stats[rank], alive=False)
        logger.error("engine core %d died: %s", rank, reason)
        error = EngineDeadError(f"engine core {rank} died: {reason}")
        for request_id in [r for r, owner in self._owner.items() if owner == rank]:
            del self._owner[request_id]
            self._prompts.pop(request_id, None)
            self._failed.append((request_id, error))
        if not self.tolerate_failure or len(self._dead) == self.size:
            raise error
        logger.warning("serving on with %d of %d engine cores (failures tolerated)", self.size - len(self._dead),
                       self.size)

    # ---- what a front reads --------------------------------------------------------------------
    def stats(self) -> list[EngineStats]:
        """Each core's load as it last published it, by rank."""
        return list(self._stats)

    def health_problem(self) -> str | None:
        if not self._dead:
            return None
        return "; ".join(f"engine core {rank} died: {reason}" for rank, reason in sorted(self._dead.items()))

    def start_profile(self, directory: str) -> None:
        self._call_all("start_profile", directory)

    def stop_profile(self) -> list[str]:
        return [path for paths in self._call_all("stop_profile") for path in paths]

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        """``EngineCore.<method>(*args)`` on every live core, their results by rank."""
        call_id = next(self._call_ids)
        ranks = [r for r in range(self.size) if r not in self._dead]
        for rank in ranks:
            self._send(rank, CallCore(call_id, method, list(args)))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(self._calls.get(call_id, [])) < len(ranks) and time.monotonic() < deadline:
            for message in self._receive(100):
                self._handle(message, self._pending)
            self._check_cores()
        done = sorted(self._calls.pop(call_id, []), key=lambda d: d.rank)
        for d in done:
            if d.error is not None:
                raise (ProfilerStateError if d.error_type == "ProfilerStateError" else RuntimeError)(d.error)
        return [d.result for d in done]

    def shutdown(self) -> None:
        """The first front: ask every core to stop and wait for this host's. Then close the socket."""
        if not self._finalizer.alive:
            return
        for rank in range(self.size if self.front_index == 0 else 0):
            if rank not in self._dead:
                self._send(rank, Shutdown())
        join_or_kill(list(self._procs.values()), _STOP_GRACE_S)
        self._finalizer()

    # ---- the socket ----------------------------------------------------------------------------
    def _send(self, rank: int, message: Any) -> None:
        self._socket.send_multipart([str(rank).encode(), encode(message)])

    def _receive(self, wait_ms: int) -> list[Any]:
        if not self._socket.poll(wait_ms):
            return []
        messages, now = [], time.monotonic()
        while self._socket.poll(0):
            identity, payload = self._socket.recv_multipart()
            message = decode_from_core(payload)
            self._last_heard[message.rank] = now
            messages.append(message)
        return messages

    def _ping_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_ping >= _PING_S:
            self._last_ping = now
            for rank in range(self.size):
                if rank not in self._dead:
                    self._send(rank, Ping())


def _process_exists(pid: int) -> bool:
    """Whether ``pid`` runs (or has ended but its parent, another front, has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _close(procs: list[mp.Process], router: Any, context: Any) -> None:
    join_or_kill(procs, 0.0)
    router.close()
    context.term()

