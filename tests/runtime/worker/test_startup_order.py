"""The start-up order the graph memory depends on: piecewise graphs (no KV cache address in them) are
captured before the KV cache is sized, so their pool is measured; full graphs, which bake the cache's
addresses in, after it is allocated."""
from __future__ import annotations

import runtime.worker.worker as worker_module
from runtime.worker.worker import Worker


class _RecordingRunner:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def warmup(self) -> None:
        self.calls.append("warmup")

    def capture_graphs(self, modes: tuple[str, ...]) -> None:
        self.calls.append(f"capture {'+'.join(modes)}")

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.calls.append(f"allocate {num_blocks}")

    def finish_capture(self) -> None:
        self.calls.append("finish")


def test_piecewise_graphs_before_kv_sizing_full_graphs_after_allocation(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(worker_module, "plan_kv_blocks", lambda config, runner: calls.append("size kv") or 7)
    worker = Worker.__new__(Worker)  # the phases only: no model
    worker.config, worker.runner, worker.startup_s = None, _RecordingRunner(calls), {}
    worker.initialize(worker.plan_kv_blocks())
    assert calls == ["warmup", "capture piecewise", "size kv", "allocate 7", "capture full", "finish"]
    assert set(worker.startup_s) == {"warmup_s", "capture_s", "memory_profile_s", "kv_allocate_s"}
