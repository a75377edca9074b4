"""The per-kernel table of runtime/profiling.py from device events (the GPU's come from CUPTI: tests/gpu)."""
from types import SimpleNamespace

from runtime.profiling import StepProfile, kernel_stats, kernel_table


def _event(name: str, us: float) -> SimpleNamespace:
    return SimpleNamespace(name=name, time_range=SimpleNamespace(elapsed_us=lambda: us))


def test_kernels_grouped_by_name_per_step_costliest_first():
    events = [_event("gemv", 10.0), _event("norm", 2.0), _event("gemv", 12.0), _event("norm", 2.0),
              _event("attention", 30.0)]
    stats = kernel_stats(events, steps=2)
    assert [(k.name, k.count_per_step, k.us_per_step) for k in stats] == [
        ("attention", 0.5, 15.0), ("gemv", 1.0, 11.0), ("norm", 1.0, 2.0)]


def test_table_has_a_row_per_kernel_with_its_share():
    profile = StepProfile(3.0, None, kernel_stats([_event("a" * 200, 30.0), _event("b", 10.0)], steps=1))
    table = kernel_table(profile, "full-b1", name_width=20)
    assert table.startswith("### full-b1")
    assert "3 kernels, 40.0 us of device time per step" in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows == ["| `" + "a" * 17 + "...` | 1 | 30.0 | 75.0 % |", "| `b` | 1 | 10.0 | 25.0 % |"]
