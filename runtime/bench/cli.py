"""`python -m runtime.bench latency|throughput|mm-encoder`: the harness behind every performance claim.

latency:    per-step decode latency at given batch sizes and context length (prefill excluded).
throughput: offline generation of N requests with fixed input/output lengths.
mm-encoder: the vision encoder alone per attention backend, eager / compiled / captured (runtime/bench/mm_encoder.py).
Prints a table and, with --json, writes the numbers to a file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from compiler import CompilationConfig, counters
from models.checkpoint import resolve_checkpoint
from models.default import DefaultModelMissing, default_model_path
from models.loader import LoadedModel, load_model, resolve_dtype
from models.testing import build_random_model, llama_1b_config, save_random_checkpoint
from runtime.bench.mm_encoder import add_parser as add_mm_encoder_parser, main_mm_encoder
from runtime.contracts.config import EngineConfig
from runtime.contracts.sampling_params import SamplingParams
from runtime.engine.llm import LLM
from runtime.platforms import current_platform

RANDOM_1B = "random-1b"


def _load(args: argparse.Namespace, compilation: CompilationConfig | None = None):
    if args.tensor_parallel_size > 1:
        return None  # each rank's worker process loads its shard (see _engine)
    if args.model == RANDOM_1B:
        config = llama_1b_config()
        dtype = resolve_dtype(args.dtype, config)
        device = current_platform.device()
        model = build_random_model(config, dtype, device, compilation_config=compilation)
        return LoadedModel(model, config, None, dtype, device, compilation)
    return load_model(args.model or default_model_path(), args.dtype, compilation_config=compilation)


def _configs(args: argparse.Namespace) -> list[tuple[str, CompilationConfig]]:
    """--config NAME=JSON (repeatable) or --graph-mode MODE ...; default: eager only."""
    named = []
    for spec in args.config or []:
        name, _, text = spec.partition("=")
        named.append((name, CompilationConfig.from_json(text or "{}")))
    for mode in args.graph_mode or []:
        cfg = {"none": {"mode": "eager"}}.get(mode, {"mode": "compile", "backend": args.backend,
                                                     "graph_mode": mode, "capture_sizes": args.capture_sizes})
        named.append((mode, CompilationConfig.from_dict(cfg)))
    return named or [("eager", CompilationConfig())]


def _variants(args: argparse.Namespace) -> list[tuple[str, CompilationConfig, dict[str, Any], list[bool | None]]]:
    """Each config with its engine arguments and the DBO states to measure on that one engine: with
    --dbo the engine starts with DBO and each measurement runs off, then on (``EngineCore.set_dbo``),
    so both sit side by side on the same compiled model, graphs and workers."""
    if not args.dbo:
        return [(name, compilation, {}, [None]) for name, compilation in _configs(args)]
    dbo = {"enable_dbo": True, "dbo_decode_token_threshold": args.dbo_decode_token_threshold,
           "dbo_prefill_token_threshold": args.dbo_prefill_token_threshold}
    return [(name, compilation, dbo, [False, True]) for name, compilation in _configs(args)]


def _row_name(name: str, dbo: bool | None) -> str:
    return name if dbo is None else f"{name},dbo={'on' if dbo else 'off'}"


def _set_dbo(llm: LLM, dbo: bool | None) -> int:
    """Apply a DBO state (None: leave as started); the DBO steps run so far, to count this run's."""
    if dbo is not None:
        llm.engine.set_dbo(dbo)
    return _runner_stats(llm)["dbo_steps"]


def _engine(loaded, args: argparse.Namespace, max_num_seqs: int, max_len: int,
            engine_args: dict[str, Any] | None = None, compilation: CompilationConfig | None = None) -> LLM:
    common = dict(max_num_seqs=max_num_seqs, max_model_len=max_len,
                  max_num_batched_tokens=max(args.max_num_batched_tokens, max_len),
                  enable_prefix_caching=False, **_kv_args(args), **(engine_args or {}))
    if loaded is None:  # tensor parallelism: the workers load the checkpoint
        return LLM(_checkpoint_path(args), dtype=args.dtype, compilation_config=compilation,
                   tensor_parallel_size=args.tensor_parallel_size,
                   enable_expert_parallel=args.enable_expert_parallel, **common)
    return LLM.from_loaded(loaded, **common)


def _checkpoint_path(args: argparse.Namespace) -> str:
    """A path workers can load; random-1b is written once as a checkpoint (random weights, so
    every rank shards the same tensors)."""
    if args.model != RANDOM_1B:
        return args.model or default_model_path()
    config = llama_1b_config()
    dtype = resolve_dtype(args.dtype, config)
    directory = os.path.join(tempfile.gettempdir(), f"graphmode-random-1b-{str(dtype).removeprefix('torch.')}")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        save_random_checkpoint(config, directory, dtype=dtype)
    return directory


def _runner_stats(llm: LLM) -> dict[str, Any]:
    """Graph pool, counters and DBO steps of the rank 0 runner."""
    info = llm.engine.executor.call_workers("runner_info", ["graphs.pool_bytes", "dbo_steps"])[0]
    return {"pool_bytes": info["graphs.pool_bytes"], "counters": argparse.Namespace(**info["counters"]),
            "dbo_steps": info["dbo_steps"]}


def _kv_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"kv_cache_memory_gb": args.kv_cache_memory_gb} if args.kv_cache_memory_gb else {}


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (length,), generator=g).tolist()


def bench_latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name, compilation, engine_args, dbo_states in _variants(args):
        counters.reset()
        start = time.perf_counter()
        loaded = _load(args, compilation)  # loaded per config: graphs bake in their runner's buffers
        llm = _engine(loaded, args, max(args.batch_sizes), args.context + 2 * args.steps + args.warmup + 8,
                      engine_args, compilation)
        cold_start = time.perf_counter() - start
        for batch, dbo in [(b, d) for b in args.batch_sizes for d in dbo_states]:
            dbo_steps_before = _set_dbo(llm, dbo)
            times, forward = _decode_step_times(llm.engine, llm.engine.model_config.vocab_size, batch, args)
            stats = _runner_stats(llm)
            rows.append({"config": _row_name(name, dbo), "batch": batch, "context": args.context,
                         "mean_ms": 1e3 * statistics.mean(times), "median_ms": 1e3 * statistics.median(times),
                         "min_ms": 1e3 * min(times),
                         "forward_ms": 1e3 * statistics.median(forward) if forward else None,
                         "cold_start_s": cold_start,
                         "graph_pool_mib": stats["pool_bytes"] / 2**20,
                         "graphs": stats["counters"].graphs_captured, "replays": stats["counters"].graph_replays,
                         **_profile_columns(getattr(llm.engine, "bench_step_profile", None)),
                         "pass_matches": sum(stats["counters"].pass_matches.values()),
                         "dbo_steps": stats["dbo_steps"] - dbo_steps_before, "tp": args.tensor_parallel_size})
        llm.engine.shutdown()
        del llm, loaded
        current_platform.empty_cache()
    if args.hf_baseline:
        rows.extend(_hf_latency(args))
    return rows


_KERNEL_COUNT_STEPS = 5


def _profile_columns(profile) -> dict[str, Any]:
    if profile is None:
        return {"kernels_per_step": None, "collective_ms": None}
    return {"kernels_per_step": profile.kernels_per_step, "collective_ms": profile.collective_ms_per_step}


def _decode_step_times(core, vocab: int, batch: int, args: argparse.Namespace) -> list[float]:
    # Enough tokens for every decode step this function runs: warm-up, timed, forward-timed and the
    # kernel-counting steps (a request that finished earlier made the kernel count read 0).
    params = SamplingParams(temperature=0.0, max_tokens=args.warmup + 2 * args.steps + _KERNEL_COUNT_STEPS + 1,
                            ignore_eos=True)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        core.add_request(rid, _prompt(vocab, args.context, i), params)
    decoding: set[str] = set()
    while len(decoding) < batch:  # prefill (possibly chunked) until every request decodes
        decoding.update(out.request_id for out in core.step())
    for _ in range(args.warmup):
        core.step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    forward = _forward_times(core, args.steps)
    if args.count_kernels:
        core.bench_step_profile = _profile_steps(core, _KERNEL_COUNT_STEPS)
    for rid in ids:
        core.abort_request(rid)
    return times, forward


def _profile_steps(core, steps: int):
    """Kernels per engine step and collective time (a graph replay's kernels count where the profiler
    sees inside graphs, as CUPTI does on CUDA); under tensor parallelism, rank 0's view."""
    started = core.executor.call_workers("profile_start")
    for _ in range(steps):
        core.step()
    return core.executor.call_workers("profile_stop", steps)[0] if all(started) else None


def _forward_times(core, steps: int) -> list[float]:
    """Rank 0's model forward alone, per step (runtime/worker/worker.py: forward_timing_start)."""
    core.executor.call_workers("forward_timing_start")
    try:
        for _ in range(steps):
            core.step()
    finally:
        times = core.executor.call_workers("forward_timing_stop")[0]
    return times


def _hf_latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    """transformers eager decode steps on the same architecture (its own KV cache), same process."""
    from transformers import AutoModelForCausalLM

    device = current_platform.device()
    if args.model == RANDOM_1B:
        config = llama_1b_config()
        dtype = resolve_dtype(args.dtype, config)
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    else:
        ckpt = resolve_checkpoint(args.model or default_model_path())
        kwargs = {"gguf_file": ckpt.gguf_file} if ckpt.gguf_file else {}
        hf = AutoModelForCausalLM.from_pretrained(ckpt.directory, **kwargs)
        hf = hf.to(device=device, dtype=resolve_dtype(args.dtype, hf.config)).eval()
    rows = []
    for batch in args.batch_sizes:
        ids = torch.randint(100, hf.config.vocab_size - 1, (batch, args.context), device=device)
        with torch.inference_mode():
            out = hf(input_ids=ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times = []
            for step in range(args.warmup + args.steps):
                current_platform.synchronize()
                start = time.perf_counter()
                out = hf(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                token.cpu()
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
                cache = out.past_key_values
        rows.append({"config": "transformers-eager", "batch": batch, "context": args.context,
                     "mean_ms": 1e3 * statistics.mean(times), "median_ms": 1e3 * statistics.median(times),
                     "min_ms": 1e3 * min(times), "forward_ms": 1e3 * statistics.median(times),
                     "cold_start_s": 0.0, "graph_pool_mib": 0.0, "graphs": 0,
                     "replays": 0, "kernels_per_step": None, "pass_matches": 0, "dbo_steps": 0})
    return rows


def bench_throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The first config (with --dbo: DBO off and on) over the same requests."""
    name, compilation, engine_args, dbo_states = _variants(args)[0]
    counters.reset()
    loaded = _load(args, compilation)
    llm = _engine(loaded, args, args.max_num_seqs, args.input_len + args.output_len + 8, engine_args, compilation)
    vocab = llm.engine.model_config.vocab_size
    prompts = [_prompt(vocab, args.input_len, i) for i in range(args.num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    rows = []
    for dbo in dbo_states:
        dbo_steps_before = _set_dbo(llm, dbo)
        llm.generate(prompts[: min(4, len(prompts))], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append({"config": _row_name(name, dbo), "requests": len(outs), "input_len": args.input_len,
                     "output_len": args.output_len, "seconds": elapsed, "requests_per_s": len(outs) / elapsed,
                     "output_tokens_per_s": generated / elapsed,
                     "total_tokens_per_s": (generated + args.input_len * len(outs)) / elapsed,
                     "dbo_steps": _runner_stats(llm)["dbo_steps"] - dbo_steps_before,
                     "tp": args.tensor_parallel_size})
    llm.engine.shutdown()
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    cells = [[f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("latency", "throughput"):
        s = sub.add_parser(name)
        s.add_argument("--model", default=None,
                       help=f"checkpoint dir/.gguf, or '{RANDOM_1B}' for a Llama-3.2-1B-shaped random model "
                            "(default: the embedded SmolLM2)")
        s.add_argument("--dtype", default="auto")
        s.add_argument("--max-num-batched-tokens", type=int, default=4096)
        s.add_argument("--kv-cache-memory-gb", type=float, default=None)
        s.add_argument("--json", default=None, help="write results to this file")
        s.add_argument("--config", action="append", metavar="NAME=JSON",
                       help="a named CompilationConfig to run (repeatable: configs run side by side)")
        s.add_argument("--graph-mode", action="append", choices=["none", "piecewise", "full", "full_and_piecewise"],
                       help="shorthand for a compiled config with this graph mode (repeatable)")
        s.add_argument("--backend", default="inductor", help="compile backend for --graph-mode configs")
        s.add_argument("--capture-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
        s.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="ranks (one worker process each) to shard the model over")
        s.add_argument("--enable-expert-parallel", action="store_true",
                       help="MoE models under tensor parallelism: whole experts per rank")
        s.add_argument("--dbo", action="store_true",
                       help="measure every config with dual-batch overlap off and on, side by side on one "
                            "engine (started with DBO; switched per measurement)")
        s.add_argument("--dbo-decode-token-threshold", type=int, default=EngineConfig.dbo_decode_token_threshold,
                       help="with --dbo: split decode-only steps of at least this many tokens")
        s.add_argument("--dbo-prefill-token-threshold", type=int, default=EngineConfig.dbo_prefill_token_threshold,
                       help="with --dbo: split steps with a prefill of at least this many tokens")
        if name == "latency":
            s.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
            s.add_argument("--context", type=int, default=128, help="prompt tokens per request")
            s.add_argument("--steps", type=int, default=20, help="timed decode steps")
            s.add_argument("--warmup", type=int, default=3)
            s.add_argument("--hf-baseline", action="store_true", help="also time transformers eager decode")
            s.add_argument("--count-kernels", action="store_true",
                           help="count device kernels per decode step with the torch profiler")
        else:
            s.add_argument("--num-requests", type=int, default=64)
            s.add_argument("--input-len", type=int, default=128)
            s.add_argument("--output-len", type=int, default=64)
            s.add_argument("--max-num-seqs", type=int, default=64)
    add_mm_encoder_parser(sub)
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    current_platform.configure_process()
    if args.command == "mm-encoder":
        return main_mm_encoder(args, report)
    try:
        rows = bench_latency(args) if args.command == "latency" else bench_throughput(args)
    except (ValueError, DefaultModelMissing) as e:  # bad model path, config or size: one line, no trace
        print(f"error: {e}", file=sys.stderr)
        return 2
    report({"command": args.command, "model": args.model or "smollm2", "dtype": args.dtype}, rows, args.json)
    return 0


def report(header: dict[str, Any], rows: list[dict[str, Any]], json_path: str | None) -> None:
    """Header line (with device and torch), the table, and the same as JSON where asked."""
    header = {**header, "device": current_platform.device_name(), "torch": torch.__version__}
    print(json.dumps(header))
    _print_table(rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({**header, "results": rows}, f, indent=2)

