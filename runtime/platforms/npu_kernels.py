"""torch_npu kernels for the graphmode custom ops (runtime/ops), served through NpuPlatform.op_kernel.

Each kernel takes its op's arguments and returns the op's result, or None where the torch_npu
kernel does not cover the call (mixed dtypes, partial rotary, ...): the op then runs its torch
reference. Written against torch_npu 2.11 .. 2.14; NOT executed on Ascend hardware by this
project's CI. The op names are spelled out here because this package imports nothing of ours.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch_npu

_NPU_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _norm_fits(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor) -> bool:
    same_dtype = all(t.dtype == x.dtype for t in (weight, *others))
    return same_dtype and x.dtype in _NPU_FLOATS and weight.shape == (x.shape[-1],)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    if not _norm_fits(x, weight):
        return None
    # torch_npu.npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd): torch_npu 2.11 (since 2.1.0).
    return torch_npu.npu_rms_norm(x.contiguous(), weight, epsilon=eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not _norm_fits(x, weight, residual) or x.shape != residual.shape:
        return None
    # torch_npu.npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06) -> (y, rstd, x1 + x2): torch_npu 2.11.
    normed, _, summed = torch_npu.npu_add_rms_norm(x.contiguous(), residual.contiguous(), weight, eps)
    return normed, summed


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    if gate_up.dtype not in _NPU_FLOATS or gate_up.shape[-1] % 2:
        return None
    # torch_npu.npu_swiglu(self, dim=-1) = silu(first half) * second half along dim: torch_npu 2.11.
    return torch_npu.npu_swiglu(gate_up.contiguous(), dim=-1)


def _rotary_factors(positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype,
                    is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of each token expanded to the full head_dim, shaped [1, T, 1, D] (BS1D)."""
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    if is_neox:  # halves rotate against each other: [c, c]
        cos, sin = cos.repeat(1, 2), sin.repeat(1, 2)
    else:  # interleaved pairs: [c0, c0, c1, c1, ...]
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    return cos.to(dtype)[None, :, None, :], sin.to(dtype)[None, :, None, :]


def _rotate(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, head_dim: int, is_neox: bool) -> torch.Tensor:
    heads = x.reshape(1, x.shape[0], -1, head_dim)  # BSND with B = 1, S = tokens
    # torch_npu.npu_rotary_mul(input, r1, r2, rotary_mode="half" | "interleave"): torch_npu 2.11
    # (rotary_mode documented since Ascend Extension for PyTorch 7.0.0).
    out = torch_npu.npu_rotary_mul(heads, r1, r2, rotary_mode="half" if is_neox else "interleave")
    return out.reshape(x.shape)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_dim: int, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    full_width = cos_sin_cache.shape[-1] == head_dim and head_dim % 2 == 0
    if not full_width or q.dtype != k.dtype or q.dtype not in _NPU_FLOATS:
        return None
    r1, r2 = _rotary_factors(positions, cos_sin_cache, q.dtype, is_neox)
    return _rotate(q, r1, r2, head_dim, is_neox), _rotate(k, r1, r2, head_dim, is_neox)


def qk_norm_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                   k_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor, head_dim: int,
                   is_neox: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    # No single torch_npu op covers it: two RMSNorm kernels, then the rotary kernel.
    if q.shape[-1] != head_dim or k.shape[-1] != head_dim:
        return None
    q_normed, k_normed = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    if q_normed is None or k_normed is None:
        return None
    return rotary_embedding(positions, q_normed, k_normed, cos_sin_cache, head_dim, is_neox)


KERNELS: dict[str, Callable[..., Any]] = {
    "graphmode::rms_norm": rms_norm,
    "graphmode::fused_add_rms_norm": fused_add_rms_norm,
    "graphmode::silu_and_mul": silu_and_mul,
    "graphmode::rotary_embedding": rotary_embedding,
    "graphmode::qk_norm_rotary": qk_norm_rotary,
}
