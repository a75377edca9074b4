"""`python -m runtime.bench agreement`: greedy tokens of each config against the first, on the same weights.

A kernel or pass that sums in another order than the ops it replaces is not bit-identical; what it must keep
is the model's greedy decoding. Each config generates ``--max-tokens`` greedy tokens (EOS ignored) for the
same ``--prompts`` random-token prompts (lengths uniform in 8..64 from a fixed seed); every row compares its
sequences with the first config's: sequences equal, tokens equal before each sequence's first difference,
and the earliest difference.
"""
from __future__ import annotations

import argparse
import gc
import random
from typing import Any

from compiler import CompilationConfig
from runtime.bench.engines import load_model_for, make_engine, named_configs, random_prompt
from runtime.bench.results import ResultTable
from runtime.contracts.sampling_params import SamplingParams
from runtime.platforms import current_platform

AGREEMENT_COLUMNS = ("config", "prompts", "tokens", "sequences_equal", "tokens_equal_before_divergence",
                     "first_divergence")
_EAGER = ("eager", CompilationConfig.from_dict({"mode": "eager", "graph_mode": "none"}))


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("agreement", parents=parents,
                       help="greedy tokens of each config against the first (eager unless --baseline-config)")
    s.add_argument("--model", default=None, help="checkpoint dir/.gguf or a random-* model (default: the embedded "
                                                 "SmolLM2)")
    s.add_argument("--dtype", default="auto", help="auto (the checkpoint's; float32 on CPU), float32, bfloat16, "
                                                   "float16 (default: auto)")
    s.add_argument("--config", action="append", metavar="NAME=JSON", required=True,
                   help="a compilation config compared with the baseline (repeatable)")
    s.add_argument("--baseline-config", default=None, metavar="NAME=JSON",
                   help="the config the others are compared with (default: eager, no graphs)")
    s.add_argument("--prompts", type=int, default=40, help="prompts, decoded as one batch (default: %(default)s)")
    s.add_argument("--max-tokens", type=int, default=24, help="greedy tokens per prompt (default: %(default)s)")
    s.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV cache size (default: the engine's)")
    s.add_argument("--json", default=None, help="write results to this file (rewritten as each config finishes)")


def _prompts(count: int, vocab: int) -> list[list[int]]:
    lengths = random.Random(0)
    return [random_prompt(vocab, lengths.randint(8, 64), seed) for seed in range(count)]


def _generate(args: argparse.Namespace, compilation: CompilationConfig) -> list[list[int]]:
    engine_args = argparse.Namespace(**vars(args), tensor_parallel_size=1, simulate_collective_us=0.0,
                                     mm_encoder_attn_backend=None, async_scheduling=None,
                                     max_num_batched_tokens=None)
    loaded = load_model_for(engine_args, compilation)
    llm = make_engine(loaded, engine_args, args.prompts, 64 + args.max_tokens + 8, compilation=compilation)
    try:
        # A progress bar: under the Triton interpreter a config takes minutes.
        outputs = llm.generate(_prompts(args.prompts, llm.engine.vocab_size),
                               SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        llm.engine.shutdown()
        del llm, loaded
        gc.collect()
        current_platform.empty_cache()


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_agreement(args: argparse.Namespace, table: ResultTable) -> None:
    """The baseline's row (agreeing with itself), then one row per --config."""
    baseline = [args.baseline_config] if args.baseline_config else []
    configs = named_configs(argparse.Namespace(config=baseline + args.config, graph_mode=None))
    reference = None
    for name, compilation in ([] if baseline else [_EAGER]) + configs:
        tokens = _generate(args, compilation)
        reference = reference or tokens
        prefixes = [_first_difference(a, b) for a, b in zip(tokens, reference)]
        table.add({"config": name, "prompts": len(tokens), "tokens": sum(map(len, tokens)),
                   "sequences_equal": sum(a == b for a, b in zip(tokens, reference)),
                   "tokens_equal_before_divergence": sum(prefixes),
                   "first_divergence": min((p for p, a in zip(prefixes, tokens) if p < len(a)), default=None)})
