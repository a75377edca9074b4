"""runtime/ops/reduction_order.py: the layouts it names for torch's CUDA row sums.

The layouts themselves were measured on an H200 (docs/perf.md, 2026-12-01); the GPU tests in
tests/gpu/test_fused_ops_triton.py check them against torch bit for bit. Here: the launch arithmetic.
"""
import pytest

from runtime.ops.reduction_order import RowSumLayout, row_sum_layout


@pytest.mark.parametrize("rows, width, layout", [
    (1, 576, RowSumLayout(lanes=128, vec=4)),  # SmolLM2 decode at batch 1: 144 vectors, 128 lanes
    (5, 576, RowSumLayout(lanes=128, vec=4)),  # up to 4 row-warps per block keep 128 lanes
    (8, 576, RowSumLayout(lanes=64, vec=4)),
    (16, 576, RowSumLayout(lanes=32, vec=4)),  # from 16 rows on: one warp per row
    (4096, 576, RowSumLayout(lanes=32, vec=4)),
    (1, 2048, RowSumLayout(lanes=512, vec=4)),
    (2, 2048, RowSumLayout(lanes=256, vec=4)),
    (1, 128, RowSumLayout(lanes=32, vec=4)),  # 128 wide is already read as vectors (measured)
    (1, 64, RowSumLayout(lanes=64, vec=1)),
    (16, 64, RowSumLayout(lanes=32, vec=1)),  # tiny test models: two elements per lane
    (1, 100, RowSumLayout(lanes=64, vec=1)),  # under 128 wide: element by element
    (4096, 16, RowSumLayout(lanes=16, vec=1)),
])
def test_layouts(rows, width, layout):
    assert row_sum_layout(rows, width) == layout


@pytest.mark.parametrize("rows, width", [
    (8, 8192),  # 64 values per thread with 4 row-warps: torch splits each row across warps
    (4096, 8192),
    (16, 1002),  # not a multiple of 4: vector loads with a scalar tail (not measured)
    (0, 576),
])
def test_unmodelled_configurations_are_refused(rows, width):
    assert row_sum_layout(rows, width) is None


def test_single_row_split_across_a_one_warp_block_is_still_modelled():
    # 512 lanes x 16 values: torch "splits" the row over block.y = 1, which changes nothing.
    assert row_sum_layout(1, 8192) == RowSumLayout(lanes=512, vec=4)


def test_steps_count_vectors_or_elements_per_lane():
    assert RowSumLayout(lanes=128, vec=4).steps(576) == 2  # 144 vectors over 128 lanes
    assert RowSumLayout(lanes=32, vec=4).steps(576) == 5
    assert RowSumLayout(lanes=64, vec=1).steps(64) == 1
    assert RowSumLayout(lanes=32, vec=1).steps(127) == 4


@pytest.mark.parametrize("width", range(1, 128))
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 100, 4096])
def test_rows_read_element_by_element_take_at_most_four_per_lane(rows, width):
    # The Triton kernel unrolls exactly four accumulators for these (triton_rms_norm.py).
    layout = row_sum_layout(rows, width)
    assert layout.vec == 1 and 1 <= layout.steps(width) <= 4
