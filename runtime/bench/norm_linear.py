"""`python -m runtime.bench norm-linear`: a decode step's norm + projection, unfused vs one fused kernel.

Per model shape and projection: ``add+RMSNorm -> q/k/v linear`` and ``add+RMSNorm -> gate/up linear ->
SiLU-and-mul`` at a few token counts, as the graph runs them without ``fuse_norm_linear`` (the norm
kernel, the platform's GEMM, the SwiGLU kernel) and with it (``graphmode::add_rms_norm_linear``).
Captured and replayed where the platform has static graphs (what decode runs), else eager. ``GB/s`` is
the bytes the call must move (weights, activations in and out) over its time; the ``copy`` row, a
device-to-device copy timed the same way, is the bandwidth those numbers compare against.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch

from runtime.bench.results import ResultTable
from runtime.bench.timing import captured, op_kernel, time_calls
from runtime.ops.kernels import use_triton
from runtime.ops.norm_linear import ADD_RMS_NORM_LINEAR_OP
from runtime.platforms import current_platform

# hidden, q/k/v projection rows, MLP intermediate
SHAPES = {"smollm2": (576, 960, 1536), "llama-1b": (2048, 3072, 8192), "tiny": (64, 96, 128)}
NORM_LINEAR_COLUMNS = ("shape", "projection", "tokens", "kernel", "mode", "us", "gb_per_s", "vs_unfused")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("norm-linear", parents=parents,
                       help="norm + projection of a decode step: the unfused ops vs the fused kernel")
    s.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["smollm2", "llama-1b"],
                   help="model geometries (default: smollm2 llama-1b)")
    s.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64], help="tokens per call (default: 1 16 64)")
    s.add_argument("--dtype", default="auto", help="auto = bfloat16 where static graphs exist, else float32")
    s.add_argument("--iters", type=int, default=200, help="timed calls per row (default: %(default)s)")
    s.add_argument("--warmup", type=int, default=10, help="untimed calls first (default: %(default)s)")
    s.add_argument("--copy-mib", type=int, default=1024,
                   help="size of the device-to-device copy that measures the bandwidth (default: %(default)s)")
    s.add_argument("--json", default=None, help="write results to this file (rewritten as each row finishes)")


def _time_us(fn: Callable[[], Any], args: argparse.Namespace) -> float:
    return 1e6 * statistics.median(time_calls(fn, args.iters, args.warmup))


def _copy_row(args: argparse.Namespace, table: ResultTable) -> None:
    size = args.copy_mib << 20
    src = torch.empty(size, dtype=torch.uint8, device=current_platform.device())
    dst = torch.empty_like(src)
    # Read once and written once: 2 x size bytes moved.
    us = 1e6 * statistics.median(time_calls(lambda: dst.copy_(src), iters=20, warmup=3))
    table.add({"shape": "-", "projection": f"copy {args.copy_mib} MiB", "tokens": 0, "kernel": "copy",
               "mode": "eager", "us": us, "gb_per_s": 2 * size / us / 1e3, "vs_unfused": None})


def bench_norm_linear(args: argparse.Namespace, table: ResultTable) -> None:
    """The copy row, then per shape, projection and token count: unfused, then fused where its kernel runs."""
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if current_platform.supports_static_graphs else torch.float32)
    device = current_platform.device()
    mode = "captured" if current_platform.supports_static_graphs else "eager"
    _copy_row(args, table)
    torch.manual_seed(0)
    for shape in args.shape:
        hidden, qkv_rows, intermediate = SHAPES[shape]
        norm_weight = torch.rand(hidden, dtype=dtype, device=device) + 0.5
        for projection, rows, gated in (("qkv", qkv_rows, False), ("gate_up+silu", 2 * intermediate, True)):
            weight = torch.randn(rows, hidden, dtype=dtype, device=device) * hidden ** -0.5
            for tokens in args.tokens:
                x, residual = (torch.randn(tokens, hidden, dtype=dtype, device=device) for _ in range(2))
                out_columns = rows // 2 if gated else rows
                moved = weight.numel() + hidden * (1 + 3 * tokens) + tokens * out_columns  # elements
                kernels = ["unfused"] + (["fused"] if use_triton(ADD_RMS_NORM_LINEAR_OP, x) else [])
                unfused_us = None
                for kernel in kernels:
                    def call() -> Any:
                        return torch.ops.graphmode.add_rms_norm_linear(x, residual, norm_weight, 1e-6, weight, None,
                                                                       gated)
                    with torch.no_grad(), op_kernel(ADD_RMS_NORM_LINEAR_OP, "torch" if kernel == "unfused" else None):
                        us = _time_us(captured(call) if mode == "captured" else call, args)
                    unfused_us = unfused_us or us
                    table.add({"shape": shape, "projection": projection, "tokens": tokens, "kernel": kernel,
                               "mode": mode, "us": us, "gb_per_s": moved * dtype.itemsize / us / 1e3,
                               "vs_unfused": unfused_us / us})
