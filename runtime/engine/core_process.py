"""One data-parallel engine core in a process of its own, driven over ZMQ by the front (dp_client.py).

The process says hello, waits for the front's ``Start`` (every core has said hello; where the
data-parallel ranks meet), builds its ``EngineCore`` and reports ``Ready``. Then it loops: take in the
front's messages, step, send what changed with its load. A dense model's cores step independently.
When the MoE experts are split over the data-parallel ranks (expert parallelism), every forward is a
collective across the cores, so they step in lockstep: each loop the cores agree (a one-number
all-reduce) whether any has work, and a core with none runs a dummy step so its peers' all-to-alls
complete. A stretch of steps that ends with every core idle is a wave (vLLM's DP waves).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import zmq

from runtime.contracts.config import EngineConfig
from runtime.engine.core import EngineCore
from runtime.engine.dp_messages import (AbortRequests, AddRequest, CallCore, CallDone, Died, Hello, Outputs, Ping,
                                        Ready, Shutdown, Start, decode_to_core, encode, unpack_images)
from runtime.engine.outputs import EngineStats

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 50  # how long an idle core waits for the front before looking again
_HEARTBEAT_S = 1.0  # an idle core still reports its load this often: the front's sign of life
_START_TIMEOUT_S = 1800.0  # the front waits for every core before it says Start


@dataclass
class EngineCoreSpec:
    config: EngineConfig  # with this core's data_parallel_rank
    front_addresses: list[str]  # tcp://host:port of each front's ROUTER socket (one per API server process)
    env: dict[str, str] = field(default_factory=dict)  # set before the device is touched (the visible devices)
    parent_pid: int | None = None  # leave when this process is gone (a front or launcher killed outright)
    front_timeout_s: float | None = None  # leave after this long without a word from the front (another node)
    log_level: int = logging.INFO


def run_engine_core(spec: EngineCoreSpec) -> None:
    """The process's target."""
    os.environ.update(spec.env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the front stops the cores in order
    # force: a forked core inherits its parent's handlers; its lines should say which core wrote them.
    logging.basicConfig(level=spec.log_level, force=True,
                        format=f"%(asctime)s %(levelname)s dp{spec.config.data_parallel_rank} %(name)s: %(message)s")
    EngineCoreProcess(spec).run()


class _Lockstep:
    """Whether any data-parallel core has work, agreed by all of them (a gloo all-reduce on the host)."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")
        self.waves = 0
        self._busy = False

    def any_busy(self, busy: bool) -> bool:
        flag = torch.tensor([int(busy)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        anyone = bool(flag.item())
        if self._busy and not anyone:
            self.waves += 1
            logger.debug("wave %d ended: every data-parallel core is idle", self.waves)
        self._busy = anyone
        return anyone


class EngineCoreProcess:
    def __init__(self, spec: EngineCoreSpec) -> None:
        self.spec = spec
        self.rank = spec.config.data_parallel_rank
        self._context = zmq.Context()
        self._sockets = []
        self._poller = zmq.Poller()
        for address in spec.front_addresses:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, str(self.rank).encode())
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(address)
            self._poller.register(sock, zmq.POLLIN)
            self._sockets.append(sock)
        self._origin: dict[str, int] = {}  # request id -> the front that sent it, which gets its outputs
        self.core: EngineCore | None = None
        self._stopping = False
        self._last_sent = 0.0
        self._last_heard = time.monotonic()
        self._sent_stats: EngineStats | None = None
        self._failed: list[tuple[int, str, str]] = []  # (front, request id, why) refused after the front took it

    def run(self) -> None:
        try:
            self._send(Hello(self.rank, os.getpid(), socket.gethostname()))
            start = self._wait_for_start()
            if start is not None:
                self.spec.config.data_parallel_master = start.master
                self.core = EngineCore(self.spec.config)
                self._send(Ready(self.rank, self.core.max_model_len, self.core.kv_cache.num_blocks))
                self._loop(_Lockstep() if self.spec.config.experts_over_data_parallel else None)
        except BaseException as e:  # noqa: BLE001 - the front must hear why, whatever it was
            logger.exception("engine core %d failed", self.rank)
            self._send(Died(self.rank, f"{type(e).__name__}: {e}"))
            raise SystemExit(1) from None
        finally:
            if self.core is not None:
                self.core.shutdown()
            for sock in self._sockets:
                sock.close()
            self._context.term()

    def _wait_for_start(self) -> Start | None:
        """The first front's Start (the others only listen), or None for a Shutdown first."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and not self._front_gone(heard_lately=False):
            for message, _ in self._receive(100):
                if isinstance(message, Start):
                    return message
                if isinstance(message, Shutdown):
                    return None
        raise TimeoutError("the front never said Start (did every engine core start?)")

    def _receive(self, wait_ms: int) -> list[tuple[object, int]]:
        """Every message waiting on any front's socket, with the front's index."""
        ready = dict(self._poller.poll(wait_ms))
        messages = []
        for front, sock in enumerate(self._sockets):
            while sock in ready and sock.poll(0):
                messages.append((decode_to_core(sock.recv()), front))
        return messages

    def _loop(self, lockstep: _Lockstep | None) -> None:
        core = self.core
        busy = False
        while not self._stopping:
            self._take_messages(0 if busy else _IDLE_POLL_MS)
            if self._stopping or self._front_gone():
                return
            local = core.has_unfinished_requests()
            busy = lockstep.any_busy(local) if lockstep is not None else local
            outputs = []
            if busy:
                steps = core.num_steps
                if local:
                    outputs = core.step()
                if lockstep is not None and core.num_steps == steps:
                    core.dummy_step()  # no forward of its own this round: its peers' collectives still need it
            self._publish(outputs)

    def _take_messages(self, wait_ms: int) -> None:
        messages = self._receive(wait_ms)
        for message, front in messages:
            self._handle(message, front)
        if messages:
            self._last_heard = time.monotonic()

    def _handle(self, message, front: int) -> None:
        core = self.core
        if isinstance(message, AddRequest):
            try:
                core.add_request(message.request_id, message.prompt_token_ids, message.params,
                                 images=unpack_images(message.images))
                self._origin[message.request_id] = front
            except ValueError as e:
                self._failed.append((front, message.request_id, str(e)))
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                core.abort_request(request_id)
                self._origin.pop(request_id, None)
        elif isinstance(message, CallCore):
            try:
                done = CallDone(self.rank, message.call_id, getattr(core, message.method)(*message.args))
            except Exception as e:  # noqa: BLE001 - the caller gets it; the core goes on
                done = CallDone(self.rank, message.call_id, None, str(e), type(e).__name__)
            self._send(done, front)
        elif isinstance(message, Shutdown):
            self._stopping = True
        elif not isinstance(message, Ping):
            logger.warning("engine core %d: unexpected message %s", self.rank, type(message).__name__)

    def _publish(self, outputs: list) -> None:
        """What changed, to the front that sent each request, with the load to every front; when nothing
        changed, the load alone once per heartbeat."""
        stats = self.core.stats()[0]
        due = time.monotonic() - self._last_sent >= _HEARTBEAT_S
        if not (outputs or self._failed or stats != self._sent_stats or due):
            return
        by_front: list[list] = [[] for _ in self._sockets]
        for out in outputs:
            front = self._origin.pop(out.request_id, 0) if out.finished else self._origin.get(out.request_id, 0)
            by_front[front].append(out)
        failed: list[list] = [[] for _ in self._sockets]
        for front, request_id, reason in self._failed:
            failed[front].append((request_id, reason))
        for front in range(len(self._sockets)):
            self._send(Outputs(self.rank, by_front[front], stats, failed[front]), front)
        self._failed, self._sent_stats = [], stats

    def _send(self, message, front: int | None = None) -> None:
        """To one front, or (None) to every front."""
        data = encode(message)
        for sock in self._sockets if front is None else [self._sockets[front]]:
            sock.send(data)
        self._last_sent = time.monotonic()

    def _front_gone(self, heard_lately: bool = True) -> bool:
        """The launcher is gone, or (``heard_lately``: once serving) the front has been silent too long."""
        spec = self.spec
        if spec.parent_pid is not None and os.getppid() != spec.parent_pid:
            logger.error("engine core %d: the process that started it is gone; leaving", self.rank)
            return True
        silent = time.monotonic() - self._last_heard
        if heard_lately and spec.front_timeout_s is not None and silent > spec.front_timeout_s:
            logger.error("engine core %d: no word from the front for %.0f s; leaving", self.rank, spec.front_timeout_s)
            return True
        return False
