"""`python -m runtime.bench latency`: per-step decode latency at given batch sizes and context length.

Each config gets its own engine (graphs bake in their runner's buffers); per batch size the requests
are prefilled, then ``--warmup`` and ``--steps`` decode steps are timed whole, then as many again with
rank 0's forward timed alone (before that, with ``--host-breakdown``, as many with the host's phases timed),
then (``--count-kernels``) a few with the kernel profiler on, then
(``--profile DIR``) 20 under the trace profiler, whose trace gives the device's idle time per step.
``--hf-baseline`` adds transformers' eager decode on the same architecture, in the same process.
"""
from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time
from typing import Any

import torch

from compiler import counters
from models.checkpoint import resolve_checkpoint
from models.default import default_model_path
from models.loader import resolve_dtype
from models.testing import llama_1b_config
from runtime.bench.engines import (RANDOM_1B, load_model_for, make_engine, random_prompt, row_name, runner_stats,
                                   scheduling_states, set_dbo, set_scheduling, traced, variants)
from runtime.bench.device_gaps import DeviceGaps, device_gaps
from runtime.bench.host_phases import host_phases
from runtime.bench.results import ResultTable
from runtime.contracts.sampling_params import RequestOutputKind, SamplingParams
from runtime.engine.core import EngineCore
from runtime.platforms import current_platform
from runtime.profiling import StepProfile, kernel_table

logger = logging.getLogger(__name__)

PROFILED_STEPS = 5  # decode steps under the kernel counter
TRACED_STEPS = 20  # decode steps under the trace profiler (--profile), read back for the device's idle time


def bench_latency(args: argparse.Namespace, table: ResultTable) -> None:
    """Each config on its own engine; its rows go into ``table`` as soon as it is measured."""
    for name, compilation, engine_args, dbo_states in variants(args):
        counters.reset()
        start = time.perf_counter()
        loaded = load_model_for(args, compilation)  # loaded per config: graphs bake in their runner's buffers
        llm = make_engine(loaded, args, max(args.batch_sizes), args.context + _decode_steps(args) + 8,
                          engine_args, compilation)
        cold_start = time.perf_counter() - start
        rows = []
        for batch, dbo, scheduling in [(b, d, a) for b in args.batch_sizes for d in dbo_states
                                       for a in scheduling_states(args)]:
            dbo_steps_before = set_dbo(llm, dbo)
            set_scheduling(llm, scheduling)
            label = row_name(name, dbo, scheduling)
            times, host, forward, profile, gaps = _decode_step_times(llm.engine, llm.engine.vocab_size, batch,
                                                                     args, f"{label}-b{batch}")
            stats = runner_stats(llm)
            rows.append({"config": label, "batch": batch, "context": args.context,
                         "mean_ms": 1e3 * statistics.mean(times), "median_ms": 1e3 * statistics.median(times),
                         "min_ms": 1e3 * min(times), "host_ms": 1e3 * statistics.median(host),
                         "forward_ms": 1e3 * statistics.median(forward) if forward else None,
                         "cold_start_s": cold_start,
                         "graph_pool_mib": stats["pool_bytes"] / 2**20,
                         "graphs": stats["counters"].graphs_captured, "replays": stats["counters"].graph_replays,
                         **_profile_columns(profile),
                         "idle_us": gaps.idle_between_launches_us if gaps else None,
                         "pass_matches": sum(stats["counters"].pass_matches.values()),
                         "dbo_steps": stats["dbo_steps"] - dbo_steps_before, "tp": args.tensor_parallel_size})
        llm.engine.shutdown()
        del llm, loaded
        gc.collect()  # the model and its compiled code sit in reference cycles: free them before the next config
        current_platform.empty_cache()
        table.add(*rows)
    if args.hf_baseline:
        table.add(*_hf_latency(args))


def _decode_steps(args: argparse.Namespace) -> int:
    """Decode steps one batch size runs: warm-up, timed, host-phase-timed, forward-timed, kernel-counted and
    traced."""
    return args.warmup + 3 * args.steps + PROFILED_STEPS + TRACED_STEPS


def _profile_columns(profile: StepProfile | None) -> dict[str, Any]:
    if profile is None:
        return {"kernels_per_step": None, "collective_ms": None}
    return {"kernels_per_step": profile.kernels_per_step, "collective_ms": profile.collective_ms_per_step}


def _decode_step_times(core: EngineCore, vocab: int, batch: int, args: argparse.Namespace, label: str
                       ) -> tuple[list[float], list[float], list[float], StepProfile | None, DeviceGaps | None]:
    """Whole-step times, host times (a step's time less what it waited for the device's results: the
    launching thread's own work), rank 0's forward times, (--count-kernels) the kernels per step, and
    (--profile) a trace of more steps with the device's idle time read from it."""
    # Enough tokens for every decode step this function runs: warm-up, timed, forward-timed and the
    # kernel-counting steps (a request that finished earlier made the kernel count read 0).
    # FINAL_ONLY, as an offline batch (LLM.generate) asks: no per-step snapshots of the outputs.
    params = SamplingParams(temperature=0.0, max_tokens=_decode_steps(args) + 1,
                            ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    requests = []
    for i, rid in enumerate(ids):
        core.add_request(rid, random_prompt(vocab, args.context, i), params)
        requests.append(core.scheduler.get_request(rid))
    while any(r.num_output_tokens + r.num_pending_outputs == 0 for r in requests):
        core.step()  # prefill (possibly chunked) until every request decodes
    for _ in range(args.warmup):
        core.step()
    times, host = [], []
    for _ in range(args.steps):
        start, waited = time.perf_counter(), core.device_wait_s
        core.step()
        times.append(time.perf_counter() - start)
        host.append(times[-1] - (core.device_wait_s - waited))
    if args.host_breakdown:
        logger.warning("%s: %s", label, host_phases(core, args.steps).summary())
    forward = _forward_times(core, args.steps)
    profile = _profile_steps(core, PROFILED_STEPS) if args.count_kernels or args.kernel_table else None
    if args.kernel_table:
        _append_kernel_table(args.kernel_table, profile, label)
    traces = traced(core, args, label, lambda: [core.step() for _ in range(TRACED_STEPS)])
    gaps = device_gaps(traces[0], TRACED_STEPS) if traces else None
    if gaps is not None:
        logger.warning("%s: %s", label, gaps.summary())
    for rid in ids:
        core.abort_request(rid)
    while core.has_unfinished_requests():  # the step still in flight, under async scheduling
        core.step()
    return times, host, forward, profile, gaps


def _profile_steps(core: EngineCore, steps: int) -> StepProfile | None:
    """Kernels per engine step and collective time (a graph replay's kernels count where the profiler
    sees inside graphs, as CUPTI does on CUDA); under tensor parallelism, rank 0's view."""
    started = core.executor.call_workers("profile_start")
    for _ in range(steps):
        core.step()
    return core.executor.call_workers("profile_stop", steps)[0] if all(started) else None


def _append_kernel_table(path: str, profile: StepProfile | None, label: str) -> None:
    with open(path, "a") as f:
        if profile is None:
            f.write(f"### {label}\n\nno device kernels: the profiler sees none on {current_platform.device_name()}\n\n")
        else:
            f.write(kernel_table(profile, label) + "\n")


def _forward_times(core: EngineCore, steps: int) -> list[float]:
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
                     "tp": 1})
    return rows
