"""`python -m runtime.bench startup`: where an engine's start-up goes, cold and warm side by side.

Each run is a process of its own, as a user's would be: a warm start is a second process finding what the
first left in the caches. A run loads the model (`load_s`), then builds the engine (`engine_s`), whose phases
are the warm-up (the model's first forward: Dynamo's trace, or loading the trace a cold start saved, the
passes and the compile happen inside it),
the graph capture (piecewise graphs before the KV cache is sized, full graphs after), the memory profile and
the KV cache allocation. The cold run starts from an empty cache root of its own (`--cache-root`, default a new
temporary directory: our compile cache and Inductor's); the warm run reuses it.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from typing import Any

STARTUP_COLUMNS = ("config", "run", "load_s", "engine_s", "trace_s", "passes_s", "compile_s", "memory_profile_s",
                   "warmup_s", "kv_allocate_s", "capture_s", "graphs", "graph_pool_mib", "graph_pool_estimate_mib",
                   "cache_hits", "cache_misses", "dynamo_traces", "traces_loaded")
_RESULT = "STARTUP-RESULT "


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("startup", parents=parents, help="engine start-up by phase, cold and warm (two processes)")
    s.add_argument("--model", default=None,
                   help="checkpoint dir/.gguf, or 'random-1b' / 'random-qwen3-0.6b' (default: the embedded SmolLM2)")
    s.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    s.add_argument("--compilation-config", default="{}", metavar="JSON",
                   help="the CompilationConfig to start with (default: {}, the engine's default)")
    s.add_argument("--max-num-seqs", type=int, default=256, help="(default: %(default)s)")
    s.add_argument("--max-num-batched-tokens", type=int, default=8192, help="(default: %(default)s)")
    s.add_argument("--max-model-len", type=int, default=2048, help="(default: %(default)s)")
    s.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="fixed KV cache size in GiB (default: profiled on a GPU, a share of RAM on CPU)")
    s.add_argument("--cache-root", default=None,
                   help="where the runs keep their caches (default: a new temporary directory, so cold is cold)")
    s.add_argument("--json", default=None, help="write results to this file (rewritten as each run finishes)")
    s.add_argument("--cprofile", default=None, metavar="DIR",
                   help="profile each run's engine construction with cProfile: DIR/<run>.prof (read with pstats or "
                        "snakeviz) and DIR/<run>.txt, the 40 costliest calls by cumulative time (default: off)")


def bench_startup(args: argparse.Namespace, table: Any) -> None:
    """The cold run, then the warm one, each in a child process; a row each."""
    from compiler import CompilationConfig

    CompilationConfig.from_json(args.compilation_config)  # a bad config fails here, once, with one line
    root = args.cache_root or tempfile.mkdtemp(prefix="graphmode-startup-")
    env = dict(os.environ, GRAPHMODE_CACHE_ROOT=os.path.join(root, "graphmode"),
               TORCHINDUCTOR_CACHE_DIR=os.path.join(root, "inductor"))
    spec = {k: getattr(args, k) for k in ("model", "dtype", "compilation_config", "max_num_seqs",
                                          "max_num_batched_tokens", "max_model_len", "kv_cache_memory_gb")}
    if args.cprofile:
        os.makedirs(args.cprofile, exist_ok=True)
    for run in ("cold", "warm"):
        profile = os.path.join(args.cprofile, run) if args.cprofile else None
        table.add({"config": args.compilation_config, "run": run, **_run_child({**spec, "cprofile": profile}, env)})


def _run_child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "runtime.bench.startup", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ValueError(f"the start-up run failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1][len(_RESULT):])


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One start-up in this process: load, then build the engine; the engine's own report of its phases."""
    from compiler import CompilationConfig, counters
    from runtime import LLM
    from runtime.bench.engines import load_model_for
    from runtime.platforms import current_platform

    current_platform.configure_process()
    compilation = CompilationConfig.from_json(spec["compilation_config"])
    start = time.perf_counter()
    loaded = load_model_for(argparse.Namespace(model=spec["model"], dtype=spec["dtype"], tensor_parallel_size=1,
                                               mm_encoder_attn_backend=None, simulate_collective_us=0.0),
                            compilation)
    load_s = time.perf_counter() - start
    engine_args = {k: spec[k] for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len")}
    if spec["kv_cache_memory_gb"]:
        engine_args["kv_cache_memory_gb"] = spec["kv_cache_memory_gb"]
    profiler = cProfile.Profile() if spec.get("cprofile") else None
    start = time.perf_counter()
    with profiler or contextlib.nullcontext():
        llm = LLM.from_loaded(loaded, **engine_args)
    engine_s = time.perf_counter() - start
    if profiler is not None:
        _write_profile(profiler, spec["cprofile"])
    report = llm.engine.startup_report()
    report.pop("load_s", None)  # the worker's own load: none here, the model came loaded
    # A warm start loads the traced graph instead of running Dynamo (compiler/trace_cache.py).
    return {"load_s": load_s, "engine_s": engine_s, **report, "dynamo_traces": counters.dynamo_traces,
            "traces_loaded": counters.traces_loaded}


def _write_profile(profiler: cProfile.Profile, path: str) -> None:
    profiler.dump_stats(f"{path}.prof")
    with open(f"{path}.txt", "w") as out:
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    from models.default import DefaultModelMissing

    try:
        print(_RESULT + json.dumps(_child(json.loads(sys.argv[1]))), flush=True)
    except (ValueError, DefaultModelMissing) as e:  # a bad model path or size: one line for the parent to show
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
