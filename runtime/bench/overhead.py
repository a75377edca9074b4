"""`python -m runtime.bench.overhead`: per-call cost of the decorated forward over the compiled callable.

Uses a tiny two-layer model (compiled with backend "eager", so the pieces are the traced FX code)
to keep device time negligible: what remains is host-side call overhead. Compares
(a) the decorated forward (after the first call it bypasses Dynamo, see compiler/direct_call.py),
(b) Dynamo's compiled function with guards dropped, and (c) the split graph module the backend
returned, called with the same flattened arguments.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from compiler import CompilationConfig
from models.testing import build_random_model, tiny_config
from runtime.attention.metadata import AttentionMetadata
from runtime.attention.kv_tensors import allocate_kv_caches
from runtime.forward_context import set_forward_context
from runtime.platforms import current_platform


def _time_us(fn, iters: int) -> float:
    samples = []
    for _ in range(5):
        current_platform.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        current_platform.synchronize()
        samples.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.bench.overhead", description=__doc__)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    current_platform.configure_process()
    device = current_platform.device()
    model = build_random_model(tiny_config("LlamaForCausalLM"), torch.float32, device,
                               compilation_config=CompilationConfig(mode="compile", backend="eager"))
    decoder = model.model
    kv = allocate_kv_caches(model, 4, 16, torch.float32, device)
    n = args.tokens
    md = AttentionMetadata.build([1] * n, [1] * n, [[0]] * n, 16, device)
    ids = torch.zeros(n, dtype=torch.long, device=device)
    pos = torch.zeros(n, dtype=torch.long, device=device)
    compiled = decoder._compiled_forward
    with set_forward_context(md, kv), torch.inference_mode():
        decoder(ids, pos)  # trace + compile
        recorded = []
        split_gm = compiled.backend.split_module
        original = split_gm.forward
        split_gm.forward = lambda *a: (recorded.append(a), original(*a))[1]
        decoder(ids, pos)
        split_gm.forward = original
        flat_args = recorded[0]
        results = {
            "decorated_us": _time_us(lambda: decoder(ids, pos), args.iters),
            "dynamo_compiled_us": _time_us(lambda: compiled.compiled(decoder, ids, pos), args.iters),
            "split_module_direct_us": _time_us(lambda: split_gm(*flat_args), args.iters),
            "eager_us": _time_us(lambda: type(decoder).original_forward(decoder, ids, pos), args.iters),
        }
    results["overhead_us"] = results["decorated_us"] - results["split_module_direct_us"]
    results["wrapper_only_us"] = results["decorated_us"] - results["dynamo_compiled_us"]
    results["direct_call"] = compiled.direct is not None
    results["device"] = current_platform.device_name()
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
