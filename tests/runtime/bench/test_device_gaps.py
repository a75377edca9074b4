"""device_gaps: a trace's device idle time split into waits between launches and gaps inside a graph."""
import json

import pytest

from runtime.bench.device_gaps import device_gaps


def _kernel(ts: float, dur: float, correlation: int, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": "k", "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def test_gaps_inside_a_replay_are_told_from_waits_between_launches(tmp_path):
    events = [
        # step 1: a graph replay (launch 1) of three kernels with 2 us boundaries, then a copy (launch 2)
        _kernel(100, 10, 1), _kernel(112, 10, 1), _kernel(124, 10, 1), _kernel(140, 5, 2, "gpu_memcpy"),
        # step 2: 20 us later the next replay (launch 3), one kernel overlapping a copy of launch 4
        _kernel(165, 30, 3), _kernel(170, 5, 4, "gpu_memcpy"),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},  # host events are ignored
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    gaps = device_gaps(str(path), steps=2)
    assert gaps.idle_inside_graphs_us == pytest.approx(4 / 2)
    assert gaps.idle_between_launches_us == pytest.approx((6 + 20) / 2)
    assert gaps.largest_gap_us == pytest.approx(20)
    assert gaps.busy_us == pytest.approx((30 + 5 + 30) / 2)
    assert "idle between launches 13.0 us/step" in gaps.summary()


def test_a_trace_without_device_activity_has_no_gaps(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 5}]}))
    assert device_gaps(str(path), steps=3) is None
