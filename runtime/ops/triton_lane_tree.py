"""The last stage of torch's CUDA row sum, for Triton kernels that sum in torch's order.

After each lane has its partial sum, torch combines lanes in a halving tree: lane ``j`` adds lane
``j + n / 2`` until one is left (runtime/ops/reduction_order.py). Each level below adds exactly two
values, so the order is fixed by this code, not by Triton's reduction lowering.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _halve(v, N: tl.constexpr):
    """[H, N] -> [H, N / 2]: lane j adds lane j + N / 2."""
    return tl.sum(tl.reshape(v, [v.shape[0], 2, N // 2]), axis=1)


@triton.jit
def lane_tree_sum(v, LANES: tl.constexpr):
    """[H, LANES] -> [H]: the lanes of each row halved down to one (LANES a power of two <= 512)."""
    if LANES >= 512:
        v = _halve(v, 512)
    if LANES >= 256:
        v = _halve(v, 256)
    if LANES >= 128:
        v = _halve(v, 128)
    if LANES >= 64:
        v = _halve(v, 64)
    if LANES >= 32:
        v = _halve(v, 32)
    if LANES >= 16:
        v = _halve(v, 16)
    if LANES >= 8:
        v = _halve(v, 8)
    if LANES >= 4:
        v = _halve(v, 4)
    if LANES >= 2:
        v = _halve(v, 2)
    return tl.sum(v, axis=1)
