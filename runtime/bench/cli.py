"""`python -m runtime.bench latency|throughput|agreement|mm-encoder|moe|norm-linear|serving|disagg|startup`:
the harness behind every performance claim.

latency:    per-step decode latency at given batch sizes and context length (prefill excluded).
throughput: offline generation of N requests with fixed input/output lengths.
agreement:  greedy tokens of compilation configs against eager (or a baseline config) on the same weights.
mm-encoder: the vision encoder alone per attention backend, eager / compiled / captured.
moe:        one sparse MoE layer, the torch reference vs the grouped GEMM, eager and captured.
norm-linear: a decode step's norm + projection, the unfused ops vs the fused kernel, beside a copy's bandwidth.
serving:    a running server: streaming decodes' inter-token latency while long prompts arrive.
disagg:     starts one instance, then a prefill + a decode instance and the proxy; serving's workload on each.
startup:    engine start-up by phase (load, trace, passes, compile, memory profile, KV, capture), cold and warm.
Prints a header line and a table; with --json, writes the numbers to a file as each config finishes,
so a run that fails or is killed later keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

import torch

from models.default import DefaultModelMissing
from runtime.bench.agreement import AGREEMENT_COLUMNS, bench_agreement
from runtime.bench.agreement import add_parser as add_agreement_parser
from runtime.bench.disagg import add_parser as add_disagg_parser
from runtime.bench.disagg import bench_disagg
from runtime.bench.engines import RANDOM_1B
from runtime.bench.latency import bench_latency
from runtime.bench.mm_encoder import add_parser as add_mm_encoder_parser
from runtime.bench.mm_encoder import bench_mm_encoder
from runtime.bench.moe_layer import MOE_COLUMNS, bench_moe_layer
from runtime.bench.moe_layer import add_parser as add_moe_parser
from runtime.bench.norm_linear import NORM_LINEAR_COLUMNS, bench_norm_linear
from runtime.bench.norm_linear import add_parser as add_norm_linear_parser
from runtime.bench.results import LATENCY_COLUMNS, MM_ENCODER_COLUMNS, THROUGHPUT_COLUMNS, ResultTable
from runtime.bench.serving import SERVING_COLUMNS, bench_serving
from runtime.bench.serving import add_parser as add_serving_parser
from runtime.bench.startup import STARTUP_COLUMNS, bench_startup
from runtime.bench.startup import add_parser as add_startup_parser
from runtime.bench.throughput import bench_throughput
from runtime.contracts.config import EngineConfig
from runtime.distributed.parallel_state import EXPERT_PARALLEL_COMMS
from runtime.logger import set_level as set_log_level
from runtime.platforms import current_platform

HELP = {"latency": "per-step decode latency at given batch sizes and context length",
        "throughput": "offline generation of N requests with fixed input/output lengths"}

# subcommand -> (its table's columns, the arguments its header names, the benchmark)
BENCHMARKS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[[argparse.Namespace, ResultTable], None]]] = {
    "latency": (LATENCY_COLUMNS, ("model", "dtype"), bench_latency),
    "throughput": (THROUGHPUT_COLUMNS, ("model", "dtype"), bench_throughput),
    "agreement": (AGREEMENT_COLUMNS, ("model", "dtype"), bench_agreement),
    "mm-encoder": (MM_ENCODER_COLUMNS, ("shape", "dtype"), bench_mm_encoder),
    "moe": (MOE_COLUMNS, ("shape", "dtype"), bench_moe_layer),
    "norm-linear": (NORM_LINEAR_COLUMNS, ("shape", "dtype"), bench_norm_linear),
    "serving": (SERVING_COLUMNS, ("url", "label"), bench_serving),
    "disagg": (SERVING_COLUMNS, ("model", "dtype"), bench_disagg),
    "startup": (STARTUP_COLUMNS, ("model", "dtype"), bench_startup),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default: WARNING)")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("latency", "throughput"):
        s = sub.add_parser(name, parents=[common], help=HELP[name])
        s.add_argument("--model", default=None,
                       help=f"checkpoint dir/.gguf, or '{RANDOM_1B}' / 'random-qwen3-0.6b' / 'random-qwen3-30b-a3b-8l' "
                            "/ 'random-smollm2' for a random model of the Llama-3.2-1B / Qwen3-0.6B / Qwen3-30B-A3B "
                            "(8 of its 48 layers) / SmolLM2-135M shape (default: the embedded SmolLM2)")
        s.add_argument("--dtype", default="auto",
                       help="auto (the checkpoint's; float32 on CPU), float32, bfloat16 or float16 (default: auto)")
        s.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="tokens per engine step at most; also the memory profile's dummy step (default: 4096; "
                            "throughput --workload nano: 16384, nano-vllm's)")
        s.add_argument("--kv-cache-memory-gb", type=float, default=None,
                       help="fixed KV cache size in GiB (default: profiled on a GPU, a share of RAM on CPU)")
        s.add_argument("--json", default=None, help="write results to this file (rewritten as each config finishes)")
        s.add_argument("--mm-encoder-attn-backend", default=None, choices=["sdpa", "naive"],
                       help="vision models: the encoder's attention kernel (default: sdpa)")
        s.add_argument("--profile", default=None, metavar="DIR",
                       help="after each measurement, run a few more steps under the torch profiler and write "
                            "every rank's trace (Chrome trace JSON, for Perfetto) under DIR/<config> (default: off)")
        s.add_argument("--config", action="append", metavar="NAME=JSON",
                       help="a named CompilationConfig to run (repeatable: configs run side by side)")
        s.add_argument("--graph-mode", action="append", choices=["none", "piecewise", "full", "full_and_piecewise"],
                       help="shorthand for a compiled config with this graph mode (repeatable)")
        s.add_argument("--backend", default="inductor",
                       help="compile backend for --graph-mode configs: inductor or eager (default: inductor)")
        s.add_argument("--capture-sizes", type=int, nargs="+", default=None,
                       help="batch sizes (tokens) captured as graphs by --graph-mode configs (default: the "
                            "compiler's ladders: full graphs 1 2 4 8..max_num_seqs, piecewise 1 2 4 .. 512)")
        s.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="ranks (one worker process each) to shard the model over")
        s.add_argument("--enable-expert-parallel", action="store_true",
                       help="MoE models under tensor parallelism: whole experts per rank")
        s.add_argument("--expert-parallel-comm", choices=EXPERT_PARALLEL_COMMS, default="all_reduce",
                       help="under --enable-expert-parallel: all_reduce (one all-reduce of every token's partial "
                            "sums) or all_to_all (tokens to their experts' ranks and back) (default: %(default)s)")
        s.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                       help="schedule and launch each step while the previous one runs on the device "
                            "(default: the platform's: on for devices with streams, off on CPU)")
        s.add_argument("--simulate-collective-us", type=float, default=0.0, metavar="US",
                       help="one device: hold it US microseconds wherever a tensor-parallel all-reduce would run "
                            "(graphmode::simulated_collective), so --dbo can show overlap without a second "
                            "device; counts as communication for the DBO policy (default: 0, off)")
        s.add_argument("--compare-scheduling", action="store_true",
                       help="measure synchronous and async scheduling side by side on each engine")
        s.add_argument("--dbo", action="store_true",
                       help="measure every config with dual-batch overlap off and on, side by side on one "
                            "engine (started with DBO; switched per measurement). On one device DBO stays "
                            "off by policy (nothing to overlap): both rows then run unsplit")
        s.add_argument("--force-dbo", action="store_true",
                       help="with --dbo: split steps even on one device (measures DBO's own cost)")
        s.add_argument("--dbo-decode-token-threshold", type=int, default=EngineConfig.dbo_decode_token_threshold,
                       help="with --dbo: split decode-only steps of at least this many tokens")
        s.add_argument("--dbo-prefill-token-threshold", type=int, default=EngineConfig.dbo_prefill_token_threshold,
                       help="with --dbo: split steps with a prefill of at least this many tokens")
        if name == "latency":
            s.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64],
                           help="decode batch sizes to time, each its own engine run (default: 1 64)")
            s.add_argument("--context", type=int, default=128, help="prompt tokens per request (default: 128)")
            s.add_argument("--steps", type=int, default=20, help="timed decode steps (default: 20)")
            s.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (default: 3)")
            s.add_argument("--hf-baseline", action="store_true", help="also time transformers eager decode")
            s.add_argument("--count-kernels", action="store_true",
                           help="count device kernels per decode step with the torch profiler")
            s.add_argument("--kernel-table", default=None, metavar="FILE",
                           help="write every counted step's kernels (name, launches and device us per step, share) "
                                "as markdown tables to FILE, one per config and batch size (implies --count-kernels)")
            s.add_argument("--host-breakdown", action="store_true",
                           help="log where each config's host time per step goes: scheduling, the launch (inputs "
                                "and forward, lm_head, sampling), taking results in, waiting for the device")
        else:
            s.add_argument("--workload", default="fixed", choices=["fixed", "nano"],
                           help="fixed: --num-requests prompts of --input-len tokens, --output-len outputs each; "
                                "nano: nano-vllm's benchmark (256 requests, input and output lengths uniform in "
                                "100..1024 from random.seed(0), temperature 0.6; max_model_len 4096) "
                                "(default: %(default)s)")
            s.add_argument("--num-requests", type=int, default=64, help="requests generated (default: 64)")
            s.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default: 128)")
            s.add_argument("--output-len", type=int, default=64,
                           help="tokens generated per request, EOS ignored (default: 64)")
            s.add_argument("--max-num-seqs", type=int, default=None,
                           help="requests batched together at most (default: 64; --workload nano: 512, nano-vllm's)")
            s.add_argument("--data-parallel-size", type=int, default=1,
                           help="engine cores (processes), the requests spread over them by load; cores that "
                                "share a device need --kv-cache-memory-gb, each core's (default: %(default)s)")
    add_agreement_parser(sub, [common])
    add_mm_encoder_parser(sub, [common])
    add_moe_parser(sub, [common])
    add_norm_linear_parser(sub, [common])
    add_serving_parser(sub, [common])
    add_disagg_parser(sub, [common])
    add_startup_parser(sub, [common])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    set_log_level(args.log_level)  # our loggers carry their own level (runtime/logger.py)
    current_platform.configure_process()
    columns, named, run = BENCHMARKS[args.command]
    header: dict[str, Any] = {"command": args.command, **{k: getattr(args, k) for k in named},
                              "device": current_platform.device_name(), "torch": torch.__version__}
    if header.get("model") is None and "model" in named:
        header["model"] = "smollm2"
    print(json.dumps(header), flush=True)
    table = ResultTable(columns, header, args.json)
    try:
        run(args, table)
    except (ValueError, DefaultModelMissing) as e:  # bad model path, config or size: one line, no trace
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:  # what was measured is printed (and was saved) even when a later config fails
        if table.rows:
            print(table.format(), flush=True)
    return 0
