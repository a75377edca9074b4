"""`python -m runtime.bench throughput`: offline generation of N requests with fixed input/output lengths."""
from __future__ import annotations

import argparse
import time

from compiler import counters
from runtime.bench.engines import (load_model_for, make_engine, random_prompt, row_name, runner_stats, set_dbo, traced,
                                   variants)
from runtime.bench.results import ResultTable
from runtime.contracts.sampling_params import SamplingParams


def bench_throughput(args: argparse.Namespace, table: ResultTable) -> None:
    """The first config (with --dbo: DBO off and on) over the same requests; a row per state."""
    name, compilation, engine_args, dbo_states = variants(args)[0]
    counters.reset()
    loaded = load_model_for(args, compilation)
    llm = make_engine(loaded, args, args.max_num_seqs, args.input_len + args.output_len + 8, engine_args, compilation)
    vocab = llm.engine.vocab_size
    prompts = [random_prompt(vocab, args.input_len, i) for i in range(args.num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for dbo in dbo_states:
        dbo_steps_before = set_dbo(llm, dbo)
        llm.generate(prompts[: min(4, len(prompts))], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        traced(llm.engine, args, row_name(name, dbo),
               lambda: llm.generate(prompts[: min(8, len(prompts))], params, use_tqdm=False))
        table.add({"config": row_name(name, dbo), "requests": len(outs), "input_len": args.input_len,
                     "output_len": args.output_len, "seconds": elapsed, "requests_per_s": len(outs) / elapsed,
                     "output_tokens_per_s": generated / elapsed,
                     "total_tokens_per_s": (generated + args.input_len * len(outs)) / elapsed,
                     "dbo_steps": runner_stats(llm)["dbo_steps"] - dbo_steps_before,
                     "tp": args.tensor_parallel_size})
    llm.engine.shutdown()
