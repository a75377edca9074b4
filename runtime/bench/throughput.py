"""`python -m runtime.bench throughput`: offline generation of N requests with fixed input/output lengths."""
from __future__ import annotations

import argparse
import random
import time

from compiler import counters
from runtime.bench.engines import (load_model_for, make_engine, random_prompt, row_name, runner_stats,
                                   scheduling_states, set_dbo, set_scheduling, traced, variants)
from runtime.bench.results import ResultTable
from runtime.contracts.sampling_params import SamplingParams


# nano-vllm's LLM defaults, which its bench.py keeps (max_model_len set to 4096).
NANO_MAX_MODEL_LEN, NANO_MAX_NUM_SEQS, NANO_MAX_BATCHED_TOKENS = 4096, 512, 16384


def nano_workload(num_requests: int = 256) -> tuple[list[list[int]], list[SamplingParams]]:
    """nano-vllm's bench.py workload: token ids in 0..10000, input and output lengths uniform in 100..1024,
    drawn from ``random.seed(0)`` in its order (all prompts, then all lengths), temperature 0.6, EOS ignored."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(num_requests)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 1024))
              for _ in range(num_requests)]
    return prompts, params


def _workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[SamplingParams]]:
    if args.workload == "nano":
        return nano_workload(256)
    prompts = [random_prompt(vocab, args.input_len, i) for i in range(args.num_requests)]
    return prompts, [SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)] * len(prompts)


def bench_throughput(args: argparse.Namespace, table: ResultTable) -> None:
    """The first config (with --dbo: DBO off and on; with --compare-scheduling: sync, then async) over the
    same requests; a row per state."""
    name, compilation, engine_args, dbo_states = variants(args)[0]
    counters.reset()
    loaded = load_model_for(args, compilation)
    if args.workload == "nano":  # nano-vllm's engine sizes unless told otherwise, as its bench.py runs
        max_len, max_num_seqs = NANO_MAX_MODEL_LEN, args.max_num_seqs or NANO_MAX_NUM_SEQS
        args.max_num_batched_tokens = args.max_num_batched_tokens or NANO_MAX_BATCHED_TOKENS
    else:
        max_len, max_num_seqs = args.input_len + args.output_len + 8, args.max_num_seqs or 64
    llm = make_engine(loaded, args, max_num_seqs, max_len, engine_args, compilation)
    prompts, params = _workload(args, llm.engine.vocab_size)
    for dbo, scheduling in [(d, a) for d in dbo_states for a in scheduling_states(args)]:
        dbo_steps_before = set_dbo(llm, dbo)
        set_scheduling(llm, scheduling)
        label = row_name(name, dbo, scheduling)
        llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        prompt_tokens = sum(len(p) for p in prompts)
        traced(llm.engine, args, label, lambda: llm.generate(prompts[:8], params[:8], use_tqdm=False))
        table.add({"config": label, "workload": args.workload, "requests": len(outs),
                   "prompt_tokens": prompt_tokens, "output_tokens": generated, "seconds": elapsed,
                   "requests_per_s": len(outs) / elapsed, "output_tokens_per_s": generated / elapsed,
                   "total_tokens_per_s": (generated + prompt_tokens) / elapsed,
                   "dbo_steps": (stats["dbo_steps"] if (stats := runner_stats(llm)) else 0) - dbo_steps_before,
                   "tp": args.tensor_parallel_size, "dp": args.data_parallel_size})
    llm.engine.shutdown()
