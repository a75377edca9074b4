"""`python -m runtime.bench moe`: one sparse MoE layer (router + ``graphmode::fused_moe``) per kernel.

The layer is the model's own ``SparseMoeBlock`` with random weights. ``reference`` is the torch op the CPU
runs (it reads each expert's group size on the host); ``grouped`` is the platform's grouped GEMM (no host
sync), timed eager and, where the platform has static graphs, captured and replayed. ``--shape
qwen3-30b-a3b`` is that model's layer (hidden 2048, 128 experts of 768, top-8); ``tiny`` the tests' model's.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch

from models.qwen3_moe import SparseMoeBlock
from runtime.bench.results import ResultTable
from runtime.bench.timing import captured, op_kernel, time_calls
from runtime.ops.moe import FUSED_MOE_OP, grouped_gemm_fits
from runtime.platforms import current_platform

# hidden, moe intermediate, experts, top-k, normalised top-k weights
SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8, True), "tiny": (64, 32, 8, 2, True)}
MOE_COLUMNS = ("shape", "tokens", "kernel", "mode", "ms", "ms_min", "vs_reference")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("moe", parents=parents, help="one sparse MoE layer: the torch reference vs the grouped GEMM")
    s.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b",
                   help="the layer's geometry (default: %(default)s)")
    s.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512], help="tokens per call (default: 1 64 512)")
    s.add_argument("--dtype", default="auto", help="auto = bfloat16 where static graphs exist, else float32")
    s.add_argument("--iters", type=int, default=50, help="timed calls per row (default: %(default)s)")
    s.add_argument("--warmup", type=int, default=5, help="untimed calls first (default: %(default)s)")
    s.add_argument("--json", default=None, help="write results to this file (rewritten as each row finishes)")


def bench_moe_layer(args: argparse.Namespace, table: ResultTable) -> None:
    """Rows per token count: the reference eager, the grouped GEMM eager and captured (where it runs)."""
    hidden, inter, experts, top_k, norm = SHAPES[args.shape]
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if current_platform.supports_static_graphs else torch.float32)
    torch.manual_seed(0)
    with torch.device(current_platform.device()):
        layer = SparseMoeBlock(hidden, inter, experts, top_k, norm).to(dtype).eval()
    probe = torch.zeros(1, hidden, dtype=dtype, device=current_platform.device())
    grouped = current_platform.has_grouped_gemm(dtype) and grouped_gemm_fits(probe, layer.w13, layer.w2)
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, dtype=dtype, device=current_platform.device())
        runs: list[tuple[str, str, Callable[[], Any]]] = [("reference", "eager", lambda: layer(x))]
        if grouped:
            runs.append(("grouped", "eager", lambda: layer(x)))
            if current_platform.supports_static_graphs:
                runs.append(("grouped", "captured", None))  # captured under its kernel choice below
        reference_ms = None
        with torch.no_grad():
            for kernel, mode, fn in runs:
                with op_kernel(FUSED_MOE_OP, "torch" if kernel == "reference" else None):
                    fn = fn or captured(lambda: layer(x))
                    samples = time_calls(fn, args.iters, args.warmup)
                ms = 1e3 * statistics.median(samples)
                reference_ms = reference_ms or ms
                table.add({"shape": args.shape, "tokens": tokens, "kernel": kernel, "mode": mode, "ms": ms,
                           "ms_min": 1e3 * min(samples), "vs_reference": reference_ms / ms})
