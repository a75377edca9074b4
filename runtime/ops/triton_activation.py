"""Triton SwiGLU kernel (CUDA; imported lazily by runtime/ops/activation.py)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = ["silu_and_mul"]

_BLOCK = 1024
# The Triton interpreter (CPU tests) has no libdevice; its tl.exp is numpy's anyway.
_LIBDEVICE = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_row_stride, n_cols, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # F.silu's CUDA kernel: x / (1 + exp(-x)) with the accurate expf and an IEEE division (tl.exp and
    # "/" are approximate on CUDA), rounded to the input dtype before the multiply.
    if LIBDEVICE:
        act = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate))
    else:
        act = tl.math.div_rn(gate, 1.0 + tl.exp(-gate))
    act = act.to(dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] -> silu(gate) * up [..., I]."""
    width = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, gate_up.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((*gate_up.shape[:-1], width), dtype=gate_up.dtype, device=gate_up.device)
    n_rows = x.shape[0]
    if n_rows == 0 or width == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(width))
    grid = (n_rows, triton.cdiv(width, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), width, BLOCK=block, LIBDEVICE=_LIBDEVICE,
                               num_warps=4 if block >= 512 else 2)
    return out
