"""``AsyncEngine``: the engine core on a background thread, with one async stream per request.

The HTTP event loop never runs model code: requests and aborts go to the engine thread through a
queue, and outputs come back through ``loop.call_soon_threadsafe`` into per-request asyncio queues.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, TypeVar

from runtime.engine.core import EngineCore
from runtime.engine.outputs import EngineStats, RequestOutput
from runtime.contracts.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    pass


@dataclass(eq=False)  # identity: the engine keeps a set of them
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the server's event loop has closed: nobody is listening any more
            pass


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.tokenizer = core.tokenizer
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        # Guards ``_closed``: once the loop's final drain has run, nothing may enter the inbox.
        self._lock = threading.Lock()
        self._closed = False
        self._listening: set[_Stream] = set()  # streams a generate() call still waits on (guarded by _lock)
        self._thread = threading.Thread(target=self._run, name="graphmode-engine", daemon=True)
        self._thread.start()

    # ---- the HTTP side ---------------------------------------------------------------------
    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       images: list | None = None, data_parallel_rank: int | None = None,
                       kv_transfer_params: dict | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request until it finishes; leaving early aborts it. ``data_parallel_rank``
        pins it to that engine core (data parallelism; checked by the caller against ``data_parallel_size``);
        ``kv_transfer_params``: prefill/decode disaggregation (``EngineCore.add_request``)."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        placement: dict[str, Any] = {} if data_parallel_rank is None else {"data_parallel_rank": data_parallel_rank}
        if kv_transfer_params is not None:
            placement["kv_transfer_params"] = kv_transfer_params
        with self._lock:
            if self._closed or self._stop.is_set():
                raise EngineDeadError(f"the engine loop has stopped{f': {self._dead}' if self._dead else ''}")
            self._inbox.put(("add", request_id, prompt, params, stream, images, placement))
            self._listening.add(stream)
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._listening.discard(stream)
            if not finished:
                self.abort(request_id)

    async def run_in_engine(self, fn: Callable[[EngineCore], T]) -> T:
        """``fn(core)`` on the engine thread, between two steps (the core is not thread-safe)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        with self._lock:
            if self._closed or self._stop.is_set():
                raise EngineDeadError("the engine loop has stopped")
            self._inbox.put(("call", fn, loop, done))
        self._wakeup.set()
        return await done

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def stats(self) -> list[EngineStats]:
        """One entry per engine core (several under data parallelism), by rank."""
        return self.core.stats()

    def health_problem(self) -> str | None:
        """Why the engine cannot serve fully (its loop stopped, an engine core died), or None."""
        if not self.is_alive:
            return "the engine loop is not running"
        return self.core.health_problem()

    @property
    def failure(self) -> BaseException | None:
        """What killed the engine loop, if something did."""
        return self._dead

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still in flight are aborted and their streams closed.

        Every waiting stream gets its error at once, not when the engine's current step ends (a long
        prefill can outlast the server's graceful shutdown, which would cut the responses off)."""
        with self._lock:
            self._stop.set()
            listening, self._listening = list(self._listening), set()
        for stream in listening:
            stream.put(EngineDeadError("the engine is shutting down"))
        self._wakeup.set()
        self._thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if self.core.has_unfinished_requests():
                    self._step()
                else:
                    self._wakeup.wait(_IDLE_WAIT_S)
                    self._wakeup.clear()
                    self.core.check_health()  # a data-parallel core may die while this one has nothing to do
        except EngineDeadError as e:  # a part of the engine died (a data-parallel core): its story is logged
            logger.error("engine loop stopped: %s", e)
            self._dead = e
        except BaseException as e:  # noqa: BLE001 - a dead loop must fail every waiting stream
            logger.exception("engine loop died")
            self._dead = e
        finally:
            with self._lock:
                self._closed = True
            self._drain_inbox()
            self._abort_all(self._dead or EngineDeadError("the engine is shutting down"))
            self.core.shutdown()  # tensor-parallel workers go with the loop

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._add(*command[1:])
            elif command[0] == "abort":
                self._abort(command[1])
            elif command[0] == "call":
                self._call(*command[1:])

    def _add(self, request_id: str, prompt, params: SamplingParams, stream: _Stream, images: list | None,
             placement: dict[str, int]) -> None:
        if self._stop.is_set():
            stream.put(EngineDeadError("the engine is shutting down"))
            return
        try:
            self.core.add_request(request_id, prompt, params, images=images, **placement)
        except (ValueError, EngineDeadError) as e:  # a bad request, or pinned to a dead data-parallel core
            stream.put(e)
            return
        self._streams[request_id] = stream

    def _call(self, fn: Callable[[EngineCore], Any], loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        try:
            result, error = fn(self.core), None
        except Exception as e:  # noqa: BLE001 - the caller gets it; the loop goes on
            result, error = None, e

        def settle() -> None:
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(result)
        with contextlib.suppress(RuntimeError):  # the caller's loop has closed: nobody waits
            loop.call_soon_threadsafe(settle)

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.core.abort_request(request_id)

    def _step(self) -> None:
        for out in self.core.step():
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]
        for request_id, error in self.core.take_failed_requests():  # e.g. its data-parallel engine core died
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(error)

    def _abort_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.core.abort_request(request_id)
            stream.put(error)
        self._streams.clear()
