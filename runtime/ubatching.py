"""Dual-batch overlap (DBO): two micro-batch threads taking turns around every collective.

Communication ops (tensor-parallel all-reduce, MoE dispatch/combine) never call a collective's
``wait`` themselves; they hand a ``launch`` callable to :func:`run_collective`. Outside a DBO step
that launches and waits at once. Inside one, the micro-batch thread yields to its sibling between
launch and wait, so the sibling's compute overlaps this micro-batch's communication.

Only one micro-batch thread runs Python at a time (a turn passed back and forth), so the model,
the counters and the graph runners see strictly sequential calls. On a device with streams each
micro-batch issues its work on its own stream, starting after the caller's stream, which joins
both at the end. The two streams are otherwise independent, so the device runs the micro-batches'
kernels concurrently (one's compute fills what the other's leaves idle) unless the step is
``ordered``: when micro-batch 1 reads what micro-batch 0 writes in the same step (a prefill cut in
two attends to the KV its first part wrote), every hand-off orders the streams with an event and
compute stays serialised in the order the threads ran it. A launched collective runs on the
communication library's own stream either way. Without streams (CPU), the async work handles of
the communication library (gloo) give the overlap.

With no collective in the forward (one device) there is nothing to yield at: :func:`run_in_turn`
runs the micro-batches one after the other on the calling thread, same streams, no thread hand-off.

Static graphs: a collective captured inside a graph replays without yielding (replay is one launch).
Each micro-batch slot replays its own graphs from its own memory pool (runtime/worker/graph_driver.py), so
the two slots' graphs may run at the same time; overlap of collectives with graphs needs the
collectives outside them: eager, or piecewise with the collective ops among ``splitting_ops``; a
full graph of a micro-batch runs its collectives inside, in order.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from runtime.platforms import current_platform

NUM_UBATCHES = 2


@dataclass(frozen=True)
class YieldPoint:
    """One entry of a DBO step's trace: which micro-batch did what at which collective."""
    ubatch: int
    action: str  # "launch" (collective started, about to yield) | "resume" (back, about to wait)
    label: str


class _Turn:
    """The baton two threads pass: ``holder`` runs, the others wait. ``last`` is the micro-batch
    that handed it over, whose stream the next holder's stream must follow."""

    def __init__(self, num: int) -> None:
        self.cond = threading.Condition()
        self.holder = 0
        self.finished = [False] * num
        self.last: UBatchContext | None = None

    def wait_for(self, ubatch: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.holder == ubatch)

    def pass_from(self, ubatch: int, finished: bool = False) -> bool:
        """Hand the turn to the next unfinished sibling; False when none is left (keep running)."""
        with self.cond:
            if finished:
                self.finished[ubatch] = True
            n = len(self.finished)
            for step in range(1, n):
                other = (ubatch + step) % n
                if not self.finished[other]:
                    self.holder = other
                    self.cond.notify_all()
                    return True
            return False


@dataclass
class UBatchContext:
    """One micro-batch thread's identity, stream and place in the turn order."""
    ubatch: int
    turn: _Turn
    stream: Any
    event: Any
    trace: list[YieldPoint] | None
    ordered: bool = True  # streams follow each other at hand-offs (see the module docstring)

    def yield_to_sibling(self) -> None:
        """Let the sibling run until it yields back (continue at once if it has finished)."""
        self.signal()
        if self.turn.pass_from(self.ubatch):
            self.turn.wait_for(self.ubatch)
            self.follow_sibling()

    def signal(self) -> None:
        """Mark how far this micro-batch's stream got; the next holder's stream continues after it."""
        if self.event is not None:
            self.event.record(self.stream)
        self.turn.last = self

    def follow_sibling(self) -> None:
        if not self.ordered:
            return
        other = self.turn.last
        if other is not None and other is not self and other.event is not None and self.stream is not None:
            self.stream.wait_event(other.event)

    def record(self, action: str, label: str) -> None:
        if self.trace is not None:
            self.trace.append(YieldPoint(self.ubatch, action, label))


class _Current(threading.local):
    ctx: UBatchContext | None = None


_current = _Current()


def run_collective(label: str, launch: Callable[[], Any]) -> None:
    """Run one collective. ``launch`` starts it and returns a handle with ``wait()`` (or None when
    the collective already completed synchronously); ``label`` names the yield point for tracing."""
    handle = launch()
    ctx = _current.ctx
    if ctx is not None:
        ctx.record("launch", label)
        ctx.yield_to_sibling()
        ctx.record("resume", label)
    if handle is not None:
        handle.wait()


class UBatchError(RuntimeError):
    @classmethod
    def of(cls, ubatch: int, error: BaseException) -> "UBatchError":
        return cls(f"micro-batch {ubatch} failed: {type(error).__name__}: {error}")


def _worker_loop(ubatch: int, jobs: queue.SimpleQueue, done: queue.SimpleQueue, stream: Any,
                 thread_setup: Callable[[], Any] | None) -> None:
    """A micro-batch thread: its stream and thread-local modes set once, then one job per step."""
    with current_platform.stream_context(stream), (thread_setup() if thread_setup else contextlib.nullcontext()):
        while (job := jobs.get()) is not None:
            ctx, fn, start_event = job
            _current.ctx = ctx
            result, error = None, None
            try:
                ctx.turn.wait_for(ubatch)
                if start_event is not None and stream is not None:
                    stream.wait_event(start_event)
                ctx.follow_sibling()
                result = fn()
                ctx.signal()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                error = e
            finally:
                _current.ctx = None
                ctx.turn.pass_from(ubatch, finished=True)
                done.put((ubatch, result, error))


def _stop(jobs: list[queue.SimpleQueue]) -> None:
    for q in jobs:
        q.put(None)


class UBatchThreads:
    """Long-lived micro-batch threads (starting two threads per step would cost more than a small
    decode step's forward). ``streams[i]`` (None entries on CPU) is current in thread ``i`` and
    ``thread_setup`` returns a context manager entered there once (e.g. ``torch.inference_mode``,
    which is per thread)."""

    def __init__(self, num: int = NUM_UBATCHES, streams: Sequence[Any] | None = None,
                 thread_setup: Callable[[], Any] | None = None) -> None:
        self.num = num
        self.streams = list(streams) if streams is not None else [None] * num
        self._jobs = [queue.SimpleQueue() for _ in range(num)]
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(num):
            threading.Thread(target=_worker_loop, args=(i, self._jobs[i], self._done, self.streams[i], thread_setup),
                             name=f"ubatch-{i}", daemon=True).start()
        # The threads hold only their queues: when this object goes, they get the stop signal.
        self._finalizer = weakref.finalize(self, _stop, self._jobs)
        # At interpreter exit, leave them blocked: a thread woken during finalisation would unwind
        # through torch's C++ frames and abort the process.
        self._finalizer.atexit = False

    def close(self) -> None:
        self._finalizer()

    def run(self, fns: Sequence[Callable[[], Any]], trace: list[YieldPoint] | None = None, *,
            ordered: bool = True) -> list[Any]:
        """Run ``fns[i]`` as micro-batch ``i``; micro-batch 0 starts, the others follow at its first
        yield. Returns their results in order; re-raises the first failure. The micro-batch streams
        start after the caller's stream, and the caller's stream continues after all of them;
        ``ordered`` also orders them at every hand-off."""
        if len(fns) != self.num:
            raise ValueError(f"expected {self.num} micro-batch functions, got {len(fns)}")
        fork = _StreamFork(self.streams)
        turn = _Turn(self.num)
        contexts = [UBatchContext(i, turn, stream, current_platform.new_event() if stream is not None else None,
                                  trace, ordered) for i, stream in enumerate(self.streams)]
        for ctx, fn in zip(contexts, fns):
            self._jobs[ctx.ubatch].put((ctx, fn, fork.start))
        results: list[Any] = [None] * self.num
        errors: list[BaseException | None] = [None] * self.num
        for _ in range(self.num):
            ubatch, results[ubatch], errors[ubatch] = self._done.get()
        fork.join([ctx.event for ctx in contexts])
        for i, e in enumerate(errors):
            if e is not None:
                raise UBatchError.of(i, e) from e
        return results


class _StreamFork:
    """The caller's stream forks into the micro-batch streams (each starts after what the caller
    queued, e.g. the copies of its inputs) and joins them back before anything reads the outputs."""

    def __init__(self, streams: Sequence[Any]) -> None:
        self.caller = current_platform.current_stream() if any(s is not None for s in streams) else None
        self.start = None
        if self.caller is not None:
            self.start = current_platform.new_event()
            self.start.record(self.caller)

    def join(self, events: Sequence[Any]) -> None:
        if self.caller is not None:
            for event in events:
                if event is not None:
                    self.caller.wait_event(event)


def run_in_turn(fns: Sequence[Callable[[], Any]], streams: Sequence[Any] | None = None, *,
                ordered: bool = True) -> list[Any]:
    """Micro-batches one after the other on the calling thread, each on its own stream: a step with
    no collective to overlap has no yield point, so threads would add only hand-offs. Unless
    ``ordered``, the device still runs the two streams' work concurrently."""
    streams = list(streams) if streams is not None else [None] * len(fns)
    fork = _StreamFork(streams)
    results: list[Any] = []
    events: list[Any] = []
    try:
        for i, (fn, stream) in enumerate(zip(fns, streams)):
            event = current_platform.new_event() if stream is not None else None
            with current_platform.stream_context(stream):
                if stream is not None:
                    stream.wait_event(fork.start)
                    if ordered and events:
                        stream.wait_event(events[-1])
                try:
                    results.append(fn())
                except Exception as e:
                    raise UBatchError.of(i, e) from e
                if event is not None:
                    event.record(stream)
            events.append(event)
    finally:
        fork.join(events)
    return results


def run_ubatches(fns: Sequence[Callable[[], Any]], *, streams: Sequence[Any] | None = None,
                 trace: list[YieldPoint] | None = None, thread_setup: Callable[[], Any] | None = None,
                 ordered: bool = True) -> list[Any]:
    """One DBO step on fresh threads (tests, one-off use); see :class:`UBatchThreads`."""
    threads = UBatchThreads(len(fns), streams, thread_setup)
    try:
        return threads.run(fns, trace, ordered=ordered)
    finally:
        threads.close()
