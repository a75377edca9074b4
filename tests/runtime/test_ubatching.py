"""The DBO mechanism: two micro-batch threads alternating around every collective."""
import contextlib
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compiler.graphs import GraphRuntime, StaticGraphRunner
from runtime.forward_context import BatchDescriptor, current_forward_context, get_forward_context, set_forward_context
from runtime import ubatching
from runtime.ubatching import (UBatchError, YieldPoint, run_collective, run_in_turn,
                               run_ubatches)


class _Handle:
    def __init__(self, log, who):
        self.log, self.who = log, who

    def wait(self):
        self.log.append(("wait", self.who))


def _alternation(labels):
    """The expected order: each micro-batch launches, the sibling runs up to its own launch, then
    the first resumes (waits) and goes on to its next launch."""
    a, b = [(0, "launch", x) for x in labels], [(1, "launch", x) for x in labels]
    ra, rb = [(0, "resume", x) for x in labels], [(1, "resume", x) for x in labels]
    order = [a[0], b[0]]
    for i in range(len(labels)):
        order += [ra[i]] + ([a[i + 1]] if i + 1 < len(labels) else [])
        order += [rb[i]] + ([b[i + 1]] if i + 1 < len(labels) else [])
    return [YieldPoint(*p) for p in order]


def test_outside_dbo_run_collective_launches_and_waits_at_once():
    log = []
    run_collective("x", lambda: log.append("launch") or _Handle(log, None))
    run_collective("y", lambda: None)  # completed synchronously: nothing to wait on
    assert log == ["launch", ("wait", None)]


def test_micro_batches_alternate_around_every_collective():
    labels = ["attn_all_reduce", "mlp_all_reduce", "moe_combine"]
    log, trace = [], []

    def micro_batch(i):
        for label in labels:
            log.append(("compute", i, label))
            run_collective(label, lambda: log.append(("launch", i, label)) or _Handle(log, (i, label)))
        return i * 10

    assert run_ubatches([lambda: micro_batch(0), lambda: micro_batch(1)], trace=trace) == [0, 10]
    assert trace == _alternation(labels)
    # Between micro-batch 0's launch and its wait, micro-batch 1 computed: that is the overlap.
    launch, wait = log.index(("launch", 0, labels[0])), log.index(("wait", (0, labels[0])))
    assert ("compute", 1, labels[0]) in log[launch:wait]


def test_a_micro_batch_without_collectives_runs_to_the_end_before_its_sibling():
    trace = []
    order = []
    results = run_ubatches([lambda: order.append(0) or "a", lambda: order.append(1) or "b"], trace=trace)
    assert results == ["a", "b"] and order == [0, 1] and trace == []


def test_uneven_collective_counts_do_not_deadlock():
    trace = []

    def micro_batch(n):
        for k in range(n):
            run_collective(f"c{k}", lambda: None)

    run_ubatches([lambda: micro_batch(3), lambda: micro_batch(1)], trace=trace)
    assert [(p.ubatch, p.action) for p in trace][:4] == [(0, "launch"), (1, "launch"), (0, "resume"), (0, "launch")]
    assert len(trace) == 8


def test_a_failing_micro_batch_is_reported_and_its_sibling_finishes():
    done = []

    def bad():
        run_collective("c", lambda: None)
        raise ValueError("boom")

    with pytest.raises(UBatchError, match="micro-batch 0 failed: ValueError: boom"):
        run_ubatches([bad, lambda: done.append(run_collective("c", lambda: None))])
    assert done == [None]


def test_in_turn_micro_batches_report_a_failure_by_micro_batch():
    def bad():
        raise ValueError("boom")

    assert run_in_turn([lambda: 1, lambda: 2]) == [1, 2]
    with pytest.raises(UBatchError, match="micro-batch 1 failed: ValueError: boom"):
        run_in_turn([lambda: 1, bad])


def test_forward_context_is_per_thread_and_per_micro_batch():
    seen = []

    def micro_batch(i):
        assert current_forward_context() is None  # the caller's context does not leak into the thread
        with set_forward_context(None, {}, batch_descriptor=BatchDescriptor(8, True, ubatch=i)):
            run_collective("c", lambda: None)  # the sibling sets its own context meanwhile
            seen.append(get_forward_context().batch_descriptor.ubatch)

    with set_forward_context(None, {}) as outer:
        run_ubatches([lambda: micro_batch(0), lambda: micro_batch(1)],
                     thread_setup=lambda: contextlib.nullcontext())
        assert get_forward_context() is outer
    assert seen == [0, 1]
    t = threading.Thread(target=lambda: seen.append(current_forward_context()))
    t.start()
    t.join()
    assert seen[-1] is None


class _Event:
    def __init__(self, log, n):
        self.name, self.log = f"e{n}", log

    def record(self, stream):
        self.log.append((stream.name, "record", self.name))


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append((self.name, "waits", event.name))


class _StreamPlatform:
    """Streams and events that log what orders what (the device's view of a DBO step)."""

    def __init__(self):
        self.log, self.events = [], 0
        self.caller = _Stream("caller", self.log)

    def new_event(self):
        self.events += 1
        return _Event(self.log, self.events)

    def current_stream(self):
        return self.caller

    def stream_context(self, stream):
        return contextlib.nullcontext()


def _waits(log, stream):
    return [event for name, what, event in log if name == stream and what == "waits"]


@pytest.mark.parametrize("runner", ["threads", "in_turn"])
@pytest.mark.parametrize("ordered", [False, True])
def test_micro_batch_streams_follow_the_caller_and_each_other_only_when_ordered(monkeypatch, runner, ordered):
    platform = _StreamPlatform()
    monkeypatch.setattr(ubatching, "current_platform", platform)
    streams = [_Stream("s0", platform.log), _Stream("s1", platform.log)]
    fns = [lambda: run_collective("c", lambda: None) or "a", lambda: run_collective("c", lambda: None) or "b"]
    if runner == "threads":
        assert run_ubatches(fns, streams=streams, ordered=ordered) == ["a", "b"]
    else:
        assert run_in_turn(fns, streams, ordered=ordered) == ["a", "b"]
    start = platform.log[0]
    assert start[:2] == ("caller", "record")
    recorded = {stream: [e for name, what, e in platform.log if name == stream and what == "record"]
                for stream in ("s0", "s1")}
    # Both start after the caller's queued work; the caller joins both streams' last records.
    assert _waits(platform.log, "s0")[0] == start[2] and _waits(platform.log, "s1")[0] == start[2]
    assert set(_waits(platform.log, "caller")) == {recorded["s0"][-1], recorded["s1"][-1]}
    # Micro-batch 1 follows micro-batch 0's stream only when ordered (a request cut in two).
    assert (set(_waits(platform.log, "s1")[1:]) & set(recorded["s0"]) != set()) == ordered
    if not ordered:
        assert _waits(platform.log, "s0") == [start[2]] and _waits(platform.log, "s1") == [start[2]]


class _FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


class _FakeGraphPlatform:
    def new_graph(self):
        return _FakeGraph()

    def graph_capture(self, graph, pool, stream=None):
        return contextlib.nullcontext()

    def memory_reserved(self):
        return 0


def test_each_micro_batch_slot_captures_its_own_graph_per_size():
    calls = []
    runner = StaticGraphRunner(lambda x: calls.append(x) or torch.full((4,), float(x)), "piece", frozenset({4}))
    runtimes = [GraphRuntime(_FakeGraphPlatform(), None), *(GraphRuntime(_FakeGraphPlatform(), None, ubatch=i)
                                                             for i in range(2))]
    outputs = {}
    for rt in runtimes:
        for value in (1, 2, 3):  # warm-up, capture, replay
            outputs[rt.ubatch] = runner(rt, 4, (value,))
    assert sorted(runner.entries, key=str) == [(0, 4), (1, 4), (None, 4)]
    # Same size, three slots: three output buffers, so two micro-batches never overwrite each other.
    assert len({id(o) for o in outputs.values()}) == 3
    assert all(e.graph.replays == 2 for e in runner.entries.values())  # once after capture, once replayed


# ---- two ranks over gloo: the same interleaving with real async collectives -----------------

def _rank_main(rank, init_file, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        inputs = [torch.randn(64, 64) for _ in range(2)]
        weight = torch.randn(64, 64)

        def layers(x, label_prefix):
            for k in range(3):
                x = x @ weight  # compute that overlaps the sibling's all-reduce
                out = x.clone()
                run_collective(f"{label_prefix}{k}", lambda: dist.all_reduce(out, async_op=True))
                x = out / 2
            return x

        reference = [layers(x.clone(), "tp") for x in inputs]
        trace = []
        overlapped = run_ubatches([lambda i=i: layers(inputs[i].clone(), "tp") for i in range(2)], trace=trace)
        same = all(torch.equal(a, b) for a, b in zip(reference, overlapped))
        queue.put((rank, same, [(p.ubatch, p.action, p.label) for p in trace]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_overlap_all_reduces_with_identical_results(tmp_path):
    """Stands in for TP=2 at the collective level: each rank runs two micro-batches whose
    all-reduces interleave (same order on both ranks), results equal to the sequential run."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = str(tmp_path / "pg")
    procs = [ctx.Process(target=_rank_main, args=(r, init_file, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = [(p.ubatch, p.action, p.label) for p in _alternation(["tp0", "tp1", "tp2"])]
    for rank, same, trace in results:
        assert same, f"rank {rank}: DBO all-reduce results differ from the sequential run"
        assert trace == expected
