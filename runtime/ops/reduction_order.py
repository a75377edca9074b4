"""The order in which torch's CUDA reduction sums a row, so a fused kernel can sum in that order too.

Why: in bf16 the unfused model's RMSNorm (``x.float().pow(2).mean(-1)``) and a fused kernel that sums
the same squares in another order differ in the last bit of the variance now and then; after a few
layers that is enough to flip a greedy choice wherever the model's top two logits are one bf16 step
apart, which at bf16's coarse logit grid is every few dozen tokens. Summing in torch's order makes
the fused kernel bit-identical, so the passes keep greedy tokens exactly.

The order for a contiguous ``[rows, width]`` fp32 tensor reduced over its last dim (ATen
``Reduce.cuh``: ``setReduceConfig``, the per-thread loops, ``block_x_reduce``), as measured on an H200
with torch 2.11 (docs/perf.md, 2026-12-01: cancellation probes and random rows, bit for bit):

- ``lanes`` threads share a row. Rows of 128 or more with ``width % 4 == 0`` are read as 4-element
  vectors (``vec = 4``): lane ``t`` adds vector ``t + k * lanes`` for k = 0, 1, ... into four
  accumulators, one per position in the vector, then combines them left to right. Narrower rows are
  read element by element (``vec = 1``): lane ``t`` adds element ``t + s * lanes`` into accumulator
  ``s % 4`` (ATen unrolls its loop by four, one accumulator per unrolled load), then combines the four
  left to right.
- Lanes combine in a halving tree: lane ``j`` adds lane ``j + n / 2`` until one is left (through
  shared memory above a warp, warp shuffles below).
- ``mean`` multiplies the sum by ``float32(1 / width)``.

``lanes`` depends on the number of rows: with few rows, more threads share each row. Where torch
also splits a row across warps or blocks (long rows, roughly from 8K wide), and where the order was
not measured (rows of 128 or more whose width is not a multiple of 4: vector loads with a scalar
tail), ``row_sum_layout`` returns None and the kernel sums in its own order. ``tests/gpu/test_fused_ops_triton.py`` holds the claim to the bit on the GPU.
"""
from __future__ import annotations

import dataclasses
import functools

_MAX_THREADS = 512  # ATen's MAX_NUM_THREADS for reductions over real dtypes
_WARP = 32
_VEC = 4  # fp32 elements per 16-byte vector load, and the number of per-thread accumulators
_VECTORIZE_FROM = 128  # rows this wide are read as vectors (measured: 128 is, 64 is not)
_MIN_VALUES_PER_THREAD = 16
_MAX_VALUES_PER_THREAD = 256


@dataclasses.dataclass(frozen=True)
class RowSumLayout:
    """How torch spreads one row's sum over threads: ``lanes`` threads, ``vec``-element loads."""

    lanes: int
    vec: int

    def steps(self, width: int) -> int:
        """Loads per lane: vectors (vec 4) or elements (vec 1). Rows read element by element are
        narrower than 128 and get at least a quarter as many lanes: at most 4 elements per lane."""
        return -(-(width // self.vec) // self.lanes)


def _last_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


@functools.lru_cache(maxsize=256)  # asked at every RMSNorm launch; a pure function of two ints
def row_sum_layout(rows: int, width: int) -> RowSumLayout | None:
    """The layout torch's CUDA reduction uses for ``x.sum(-1)`` of a contiguous fp32 [rows, width]
    tensor, or None where torch splits a row across warps or blocks (not modelled)."""
    if rows < 1 or width < 1 or (width >= _VECTORIZE_FROM and width % _VEC):
        return None
    vec = _VEC if width >= _VECTORIZE_FROM else 1
    dim0 = width // vec
    dim0_pow2 = _last_pow2(dim0) if dim0 < _MAX_THREADS else _MAX_THREADS
    dim1_pow2 = _last_pow2(rows) if rows < _MAX_THREADS else _MAX_THREADS
    lanes = min(dim0_pow2, _WARP)
    height = min(dim1_pow2, _MAX_THREADS // lanes)
    lanes = min(dim0_pow2, _MAX_THREADS // height)
    values_per_thread = -(-width // lanes)
    splits_across_warps = values_per_thread >= min(height * _MIN_VALUES_PER_THREAD, _MAX_VALUES_PER_THREAD)
    # A split across a one-warp block changes nothing; past 256 values per thread torch also splits
    # the row across blocks.
    if splits_across_warps and (height > 1 or values_per_thread >= _MAX_VALUES_PER_THREAD):
        return None
    return RowSumLayout(lanes=lanes, vec=vec)
