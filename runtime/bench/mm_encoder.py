"""`python -m runtime.bench mm-encoder`: the vision encoder alone, per attention backend and run mode.

For each encoder attention backend and each mode (``eager``; ``compiled``: one Dynamo trace for
every image size; ``captured``: compiled and captured as a static graph per patch budget, each
image padded to its budget) it times one encoder forward per image size. The budgets are the
given images' patch counts, so ``captured`` measures each image at its own budget; on a platform
without static graphs ``captured`` runs the compiled encoder (the row says graphs=False).
``--shape qwen2-vl-2b`` is a random encoder of Qwen2-VL-2B's shape; ``tiny`` the test model's.
"""
from __future__ import annotations

import argparse
import logging
import statistics
from typing import Any

import torch

from compiler import CompilationConfig, counters
from models.qwen2_vl_processing import smart_resize
from models.qwen2_vl_vision import VisionTransformer
from models.vision_testing import qwen2_vl_2b_vision_config, tiny_qwen2_vl_config
from runtime.attention.encoder_attention import ENCODER_ATTENTION_BACKENDS
from runtime.bench.results import ResultTable
from runtime.bench.timing import time_calls
from runtime.worker.encoder_runner import EncoderRunner
from runtime.platforms import current_platform

logger = logging.getLogger(__name__)

MODES = ("eager", "compiled", "captured")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("mm-encoder", parents=parents, help="vision encoder: attention backends x eager/compiled/captured")
    s.add_argument("--shape", choices=["tiny", "qwen2-vl-2b"], default="tiny",
                   help="random encoder: the tests' tiny one, or Qwen2-VL-2B's vision tower shape")
    s.add_argument("--image-sizes", default="224x224,448x448,644x476",
                   help="comma-separated HxW in pixels (resized like the Qwen2-VL processor)")
    s.add_argument("--backends", default=",".join(sorted(ENCODER_ATTENTION_BACKENDS)),
                   help="comma-separated encoder attention backends (default: all)")
    s.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated: eager, compiled (torch.compile), captured (a static graph per patch budget)")
    s.add_argument("--dtype", default="auto", help="auto = bfloat16 where static graphs exist, else float32")
    s.add_argument("--compile-backend", default=None, help="Dynamo backend (default: the platform's)")
    s.add_argument("--iters", type=int, default=10, help="timed runs per image size")
    s.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    s.add_argument("--json", default=None, help="write results to this file (rewritten as each backend x mode finishes)")


def _vision_config(shape: str) -> Any:
    return qwen2_vl_2b_vision_config() if shape == "qwen2-vl-2b" else tiny_qwen2_vl_config().vision_config


def _grids(sizes: str, config: Any) -> list[tuple[str, tuple[int, int, int]]]:
    out = []
    factor = config.patch_size * config.spatial_merge_size
    for text in sizes.split(","):
        try:
            h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"--image-sizes: {text!r} is not HxW") from None
        rh, rw = smart_resize(h, w, factor, 56 * 56, 28 * 28 * 16384)
        out.append((text, (1, rh // config.patch_size, rw // config.patch_size)))
    return out


def _encoder(config: Any, backend: str, mode: str, dtype: torch.dtype, compile_backend: str | None,
             budgets: list[int]) -> VisionTransformer:
    compilation = CompilationConfig(mode="eager" if mode == "eager" else "compile", backend=compile_backend,
                                    graph_mode="full" if mode == "captured" else "none", capture_sizes=budgets)
    torch.manual_seed(0)
    with torch.device(current_platform.device()):
        encoder = VisionTransformer(config, backend, compilation_config=compilation)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.02)
    return encoder.to(dtype).eval()


def bench_mm_encoder(args: argparse.Namespace, table: ResultTable) -> None:
    """A row per (backend, mode, image size); each backend x mode goes into ``table`` when measured."""
    config = _vision_config(args.shape)
    images = _grids(args.image_sizes, config)
    budgets = sorted({t * h * w for _, (t, h, w) in images})
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if current_platform.supports_static_graphs else torch.float32)
    device = current_platform.device()
    unknown = [b for b in args.backends.split(",") if b not in ENCODER_ATTENTION_BACKENDS]
    if unknown:
        raise ValueError(f"--backends: unknown {unknown}; known: {', '.join(sorted(ENCODER_ATTENTION_BACKENDS))}")
    for backend in args.backends.split(","):
        for mode in args.modes.split(","):
            if mode not in MODES:
                raise ValueError(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
            counters.reset()
            encoder = _encoder(config, backend, mode, dtype, args.compile_backend, budgets)
            decoder_config = CompilationConfig(encoder=encoder.compilation_config)
            runner = EncoderRunner(encoder, budgets[-1], device, decoder_config)
            runner.capture()
            rows = []
            for label, grid in images:
                n = grid[0] * grid[1] * grid[2]
                pixels = torch.randn(n, encoder.patch_dim, device=device, dtype=dtype)
                samples = time_calls(lambda: runner.run(pixels, [grid]), args.iters, args.warmup)
                rows.append({"backend": backend, "mode": mode, "image": label, "patches": n,
                             "budget": runner.budget_for(n), "graphs": runner.graphs is not None,
                             "ms": 1e3 * statistics.median(samples), "ms_min": 1e3 * min(samples),
                             "traces": counters.dynamo_traces})
            runner = encoder = None  # free this one's graphs and weights before the next
            current_platform.empty_cache()
            table.add(*rows)
