"""The KV connector over TCP with pyzmq: the producer serves saved prompt KV from a thread, consumers fetch it.

Producer: a ROUTER socket at ``kv_ip:kv_port`` on a thread of its own; a fetch names a request id and gets
one multipart message back: a msgpack header (token count, each rank's layers with dtype and shape) and one
raw frame per tensor, or a header with the reason there is none (unknown, expired). A saved KV is sent once,
then dropped; unfetched ones expire after ``transfer_timeout_s``.
Consumer: each fetch runs on a small thread pool with a socket of its own and gives up after
``transfer_timeout_s``. On a GPU the KV reaches the host before it is sent (``Worker.read_kv``) and the
consumer's workers copy it back to the device (``Worker.write_kv``).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgspec
import torch
import zmq

from runtime.engine.kv_connector import KVConnector, KVTransferConfig, PromptKV

logger = logging.getLogger(__name__)

_POLL_MS = 100
_FETCH_THREADS = 4


class _Header(msgspec.Struct):
    num_tokens: int = 0
    layers: list[list[tuple[str, str, list[int]]]] = []  # per rank: (layer name, dtype, shape), one frame each
    error: str | None = None


def encode_kv(kv: PromptKV) -> list[bytes | memoryview]:
    layers, frames = [], []
    for rank in kv.ranks:
        layers.append([(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in rank.items()])
        frames.extend(memoryview(t.contiguous().view(torch.uint8).numpy()) for t in rank.values())
    return [msgspec.msgpack.encode(_Header(kv.num_tokens, layers)), *frames]


def decode_kv(frames: list[bytes]) -> PromptKV:
    header = msgspec.msgpack.decode(frames[0], type=_Header)
    if header.error is not None:
        raise RuntimeError(header.error)
    data, ranks = iter(frames[1:]), []
    for layers in header.layers:
        rank = {}
        for name, dtype, shape in layers:
            raw = torch.frombuffer(bytearray(next(data)), dtype=torch.uint8)
            rank[name] = raw.view(getattr(torch, dtype)).reshape(shape)
        ranks.append(rank)
    return PromptKV(header.num_tokens, ranks)


class ZmqKVConnector(KVConnector):
    def __init__(self, config: KVTransferConfig) -> None:
        super().__init__(config)
        self._context = zmq.Context()
        self._lock = threading.Lock()
        self._saved: dict[str, tuple[float, PromptKV]] = {}  # request id -> (expiry, its KV)
        self._loads: dict[str, Future] = {}
        self._stop = threading.Event()
        self._server: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="graphmode-kv-fetch")
        if config.is_producer:
            socket = self._context.socket(zmq.ROUTER)
            socket.setsockopt(zmq.LINGER, 0)
            try:
                socket.bind(f"tcp://{config.kv_ip}:{config.kv_port}")
            except zmq.ZMQError as e:
                socket.close()
                self._context.term()
                raise ValueError(f"cannot serve KV on {config.kv_ip}:{config.kv_port}: {e}") from None
            self._server = threading.Thread(target=self._serve, args=(socket,), name="graphmode-kv-serve", daemon=True)
            self._server.start()
            logger.info("KV producer: serving saved prompt KV on %s:%d", config.kv_ip, config.kv_port)

    # ---- producer ----------------------------------------------------------------------------
    def save(self, request_id: str, kv: PromptKV) -> dict[str, Any]:
        with self._lock:
            self._saved[request_id] = (time.monotonic() + self.config.transfer_timeout_s, kv)
        return {"remote_host": self.config.kv_ip, "remote_port": self.config.kv_port,
                "remote_request_id": request_id, "num_tokens": kv.num_tokens}

    def _serve(self, socket: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if socket.poll(_POLL_MS):
                    identity, request_id = socket.recv_multipart()
                    socket.send_multipart([identity, *self._take(request_id.decode())], copy=False)
                self._expire()
        finally:
            socket.close()

    def _take(self, request_id: str) -> list:
        with self._lock:
            entry = self._saved.pop(request_id, None)
        if entry is None:
            return [msgspec.msgpack.encode(_Header(error=f"no saved KV for request {request_id!r} (unknown, "
                                                        "already fetched, or expired)"))]
        self.sent_tokens += entry[1].num_tokens
        return encode_kv(entry[1])

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [r for r, (deadline, _) in self._saved.items() if deadline < now]
            for request_id in expired:
                del self._saved[request_id]
        for request_id in expired:
            logger.warning("KV producer: the saved KV of request %s expired unfetched", request_id)

    # ---- consumer ----------------------------------------------------------------------------
    def start_load(self, request_id: str, params: dict[str, Any]) -> None:
        try:
            address = f"tcp://{params['remote_host']}:{int(params['remote_port'])}"
            remote_id = str(params["remote_request_id"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("kv_transfer_params must carry remote_host, remote_port and remote_request_id (a "
                             "prefill instance's response gives them)") from None
        self._loads[request_id] = self._pool.submit(self._fetch, address, remote_id)

    def _fetch(self, address: str, remote_id: str) -> PromptKV:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(address)
            socket.send(remote_id.encode())
            if not socket.poll(int(self.config.transfer_timeout_s * 1000)):
                raise TimeoutError(f"no answer from the producer at {address} within "
                                   f"{self.config.transfer_timeout_s:.0f} s")
            return decode_kv(socket.recv_multipart())
        finally:
            socket.close()

    def finished_loads(self) -> list[tuple[str, PromptKV | Exception]]:
        done = [request_id for request_id, future in self._loads.items() if future.done()]
        out: list[tuple[str, PromptKV | Exception]] = []
        for request_id in done:
            future = self._loads.pop(request_id)
            error = future.exception()
            if error is None:
                self.received_tokens += future.result().num_tokens
            out.append((request_id, error if error is not None else future.result()))
        return out

    def cancel_load(self, request_id: str) -> None:
        future = self._loads.pop(request_id, None)
        if future is not None:
            future.cancel()

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.join(2 * _POLL_MS / 1000)
        # Fetches still waiting hold sockets of their own until they time out: the context goes with the process.
        self._pool.shutdown(wait=False, cancel_futures=True)
