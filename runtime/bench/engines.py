"""What the latency and throughput benchmarks share: the configs to run, the model and the engine."""
from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
from typing import Any, Callable

import torch

from compiler import CompilationConfig
from models.default import default_model_path
from models.loader import LoadedModel, load_model, resolve_dtype
from models.testing import (build_random_model, llama_1b_config, qwen3_0_6b_config, qwen3_30b_a3b_config,
                            save_random_checkpoint, smollm2_135m_config)
from runtime.distributed.parallel_state import ParallelContext, use_parallel
from runtime.engine.core import EngineCore
from runtime.engine.llm import LLM
from runtime.platforms import current_platform

logger = logging.getLogger(__name__)

RANDOM_1B = "random-1b"
# Random-weight models of a real shape, built in memory (no checkpoint needed): name -> config.
RANDOM_MODELS = {RANDOM_1B: llama_1b_config, "random-qwen3-0.6b": qwen3_0_6b_config,
                 "random-qwen3-30b-a3b-8l": qwen3_30b_a3b_config, "random-smollm2": smollm2_135m_config}


def load_model_for(args: argparse.Namespace, compilation: CompilationConfig | None = None) -> LoadedModel | None:
    """The model in this process; None under tensor or data parallelism (each rank's process loads it)."""
    if args.tensor_parallel_size > 1 or getattr(args, "data_parallel_size", 1) > 1:
        return None
    if args.simulate_collective_us:  # layers read the parallel context as they are built
        with use_parallel(ParallelContext(simulate_collective_us=args.simulate_collective_us)):
            return _load(args, compilation)
    return _load(args, compilation)


def _load(args: argparse.Namespace, compilation: CompilationConfig | None) -> LoadedModel:
    if args.model in RANDOM_MODELS:
        config = RANDOM_MODELS[args.model]()
        dtype = resolve_dtype(args.dtype, config)
        device = current_platform.device()
        model = build_random_model(config, dtype, device, compilation_config=compilation)
        return LoadedModel(model, config, None, dtype, device, compilation)
    options = {"encoder_attention": args.mm_encoder_attn_backend} if args.mm_encoder_attn_backend else {}
    return load_model(args.model or default_model_path(), args.dtype, compilation_config=compilation,
                      model_options=options)


def named_configs(args: argparse.Namespace) -> list[tuple[str, CompilationConfig]]:
    """--config NAME=JSON (repeatable) or --graph-mode MODE ...; default: the platform's default config."""
    named = []
    for spec in args.config or []:
        name, _, text = spec.partition("=")
        named.append((name, CompilationConfig.from_json(text or "{}")))
    for mode in args.graph_mode or []:
        cfg = {"none": {"mode": "eager", "graph_mode": "none"}}.get(mode, {"mode": "compile", "backend": args.backend,
                                                                          "graph_mode": mode,
                                                                          "capture_sizes": args.capture_sizes})
        named.append((mode, CompilationConfig.from_dict(cfg)))
    return named or [("default", CompilationConfig())]


def checkpoint_path(args: argparse.Namespace) -> str:
    """A path workers can load; a random model is written once as a checkpoint (random weights, so
    every rank shards the same tensors)."""
    if args.model not in RANDOM_MODELS:
        return args.model or default_model_path()
    config = RANDOM_MODELS[args.model]()
    dtype = resolve_dtype(args.dtype, config)
    directory = os.path.join(tempfile.gettempdir(), f"graphmode-{args.model}-{str(dtype).removeprefix('torch.')}")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        save_random_checkpoint(config, directory, dtype=dtype)
    return directory


def runner_stats(llm: LLM) -> dict[str, Any] | None:
    """Graph pool, counters and DBO steps of the rank 0 runner (None under data parallelism: the runners are
    in the engine cores' processes)."""
    if not isinstance(llm.engine, EngineCore):  # a data-parallel client
        return None
    info = llm.engine.executor.call_workers("runner_info", ["graphs.pool_bytes", "dbo_steps"])[0]
    return {"pool_bytes": info["graphs.pool_bytes"], "counters": argparse.Namespace(**info["counters"]),
            "dbo_steps": info["dbo_steps"]}


def traced(core: Any, args: argparse.Namespace, label: str, run: Callable[[], Any]) -> list[str]:
    """With --profile DIR: ``run()`` again under the torch profiler, every rank tracing into DIR/label
    (kept apart from the timed runs, which the profiler would slow); the trace files, rank 0's first."""
    if not args.profile:
        return []
    directory = os.path.join(args.profile, re.sub(r"[^\w.=,-]+", "_", label))
    core.start_profile(directory)
    paths: list[str] = []
    try:
        run()
    finally:
        paths = core.stop_profile()
        for path in paths:
            logger.warning("trace: %s", path)
    return paths


def kv_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"kv_cache_memory_gb": args.kv_cache_memory_gb} if args.kv_cache_memory_gb else {}


def random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (length,), generator=g).tolist()


def variants(args: argparse.Namespace) -> list[tuple[str, CompilationConfig, dict[str, Any], list[bool | None]]]:
    """Each config with its engine arguments and the DBO states to measure on that one engine: with
    --dbo the engine starts with DBO and each measurement runs off, then on (``EngineCore.set_dbo``),
    so both sit side by side on the same compiled model, graphs and workers."""
    if not args.dbo:
        return [(name, compilation, {}, [None]) for name, compilation in named_configs(args)]
    dbo = {"enable_dbo": True, "force_dbo": args.force_dbo,
           "dbo_decode_token_threshold": args.dbo_decode_token_threshold,
           "dbo_prefill_token_threshold": args.dbo_prefill_token_threshold}
    return [(name, compilation, dbo, [False, True]) for name, compilation in named_configs(args)]


def row_name(name: str, dbo: bool | None, async_scheduling: bool | None = None) -> str:
    name = name if dbo is None else f"{name},dbo={'on' if dbo else 'off'}"
    return name if async_scheduling is None else f"{name},{'async' if async_scheduling else 'sync'}"


def scheduling_states(args: argparse.Namespace) -> list[bool | None]:
    """With --compare-scheduling: synchronous, then async, on the same engine; else as the engine started."""
    return [False, True] if args.compare_scheduling else [None]


def set_scheduling(llm: LLM, async_scheduling: bool | None) -> None:
    if async_scheduling is not None:
        llm.engine.set_async_scheduling(async_scheduling)


def set_dbo(llm: LLM, dbo: bool | None) -> int:
    """Apply a DBO state (None: leave as started); the DBO steps run so far, to count this run's."""
    if dbo is not None:
        llm.engine.set_dbo(dbo)
    stats = runner_stats(llm)
    return stats["dbo_steps"] if stats else 0


DEFAULT_MAX_BATCHED_TOKENS = 4096


def make_engine(loaded, args: argparse.Namespace, max_num_seqs: int, max_len: int,
            engine_args: dict[str, Any] | None = None, compilation: CompilationConfig | None = None) -> LLM:
    common = dict(max_num_seqs=max_num_seqs, max_model_len=max_len, async_scheduling=args.async_scheduling,
                  simulate_collective_us=args.simulate_collective_us,
                  max_num_batched_tokens=max(args.max_num_batched_tokens or DEFAULT_MAX_BATCHED_TOKENS, max_len),
                  enable_prefix_caching=False, mm_encoder_attn_backend=args.mm_encoder_attn_backend,
                  **kv_args(args), **(engine_args or {}))
    if loaded is None:  # tensor or data parallelism: the workers load the checkpoint
        return LLM(checkpoint_path(args), dtype=args.dtype, compilation_config=compilation,
                   tensor_parallel_size=args.tensor_parallel_size,
                   data_parallel_size=getattr(args, "data_parallel_size", 1),
                   enable_expert_parallel=args.enable_expert_parallel,
                   expert_parallel_comm=args.expert_parallel_comm, **common)
    return LLM.from_loaded(loaded, **common)
