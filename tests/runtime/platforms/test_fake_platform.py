"""The runtime takes graphs, pool, streams, kernels and backends from the platform object, and
nothing outside runtime/platforms branches on device type.

A fake platform (tests/fake_platform.py, not shipped) is loaded through GRAPHMODE_PLATFORM in a
fresh process; every device facility it provides records its use, and its fake static graph
replays recorded work, so greedy tokens through its graphs must equal the eager ones.
"""
from __future__ import annotations

import re

import pytest

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
FUSED_OPS = ["graphmode::rms_norm", "graphmode::fused_add_rms_norm", "graphmode::silu_and_mul",
             "graphmode::rotary_embedding"]


@pytest.fixture(scope="module")
def report() -> dict:
    from tests.helpers.fake_platform import run_with_fake_platform

    return run_with_fake_platform("from tests.helpers import fake_platform; fake_platform.main()")


def test_the_plugin_platform_is_current(report):
    assert report["platform"] == "FakePlatform"


def test_graphs_and_pool_come_from_the_platform_and_replay_correctly(report):
    calls = report["graph_calls"]
    # Piecewise: 3 pieces x 4 sizes; full: 3 sizes; each graph made by new_graph, captured in its context.
    assert calls["new_graph"] == calls["graph_capture"] == 3 * 4 + 3
    assert calls["graph_replay"] > calls["graph_capture"]  # one replay per capture, then decode steps
    # One pool per engine, handed out by graph_pool_handle and passed to every capture of that engine.
    assert calls["graph_pool_handle"] == 2
    assert report["capture_pools"] == [0] * (3 * 4) + [1] * 3
    assert report["piecewise_tokens"] == report["eager_tokens"]
    assert report["full_tokens"] == report["eager_tokens"]


def test_kernels_attention_and_compile_backend_come_from_the_platform(report):
    calls = report["graph_calls"]
    for op in FUSED_OPS:
        assert calls.get(f"kernel {op}", 0) > 0, f"{op} never reached the platform's kernel"
    assert calls["attention paged_attention"] > 0 and calls["attention store_kv"] > 0
    assert calls["compile fake-compiler"] == 3  # one per compiled piece of the 2-layer model


def test_micro_batch_streams_and_events_come_from_the_platform(report):
    assert report["ubatch_results"] == ["ubatch-0", 2]
    assert set(report["streams_made"]) <= set(report["streams_entered"])
    stream_calls = report["stream_calls"]
    assert stream_calls["new_event"] >= 2 and stream_calls["event_record"] >= 2
    assert stream_calls["stream_wait_event"] >= 2


# ---- grep-level check ------------------------------------------------------------------------
# Where device names may appear, and why: the platforms themselves; the CUDA-only tests, which pick
# their device; the platform tests, which name the platforms they test (this file lists the patterns).
ALLOWED = ("runtime/platforms/", "tests/gpu/", "tests/runtime/platforms/")
SCANNED = ("compiler", "passes", "runtime", "models", "tests", "examples")
DEVICE_BRANCHING = [
    (re.compile(r"\bnpu\b|torch_npu|torchair", re.IGNORECASE), "mentions npu"),
    (re.compile(r"torch\.cuda\b"), "calls torch.cuda"),
    (re.compile(r"\.is_(cuda|npu)\b"), "tests a tensor's device type"),
    (re.compile(r"""["']cuda["']"""), "names the cuda device type"),
    (re.compile(r"(DeviceType|ProfilerActivity)\.CUDA\b"), "uses CUDA profiler/device enums"),
]


def test_nothing_outside_platforms_branches_on_device_type():
    problems = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(ALLOWED):
                continue
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                problems += [f"{rel}:{lineno} {why}: {line.strip()}" for pattern, why in DEVICE_BRANCHING
                             if pattern.search(line)]
    assert not problems, "device-specific code outside runtime/platforms:\n" + "\n".join(problems)
