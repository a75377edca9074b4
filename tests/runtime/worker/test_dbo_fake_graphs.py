"""DBO with static graphs, on the fake device platform (tests/fake_platform.py): its graphs replay
recorded work on the captured tensors and its streams and events record their use, so the CPU can
check what the GPU relies on: each micro-batch slot captures and replays its own graphs (same-size
micro-batches never share buffers) and the greedy tokens equal DBO off, piecewise and full.
"""
from __future__ import annotations

import json
import sys
import tempfile

import pytest

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
SIZES = [1, 2, 4, 8, 16]
MODES = {
    "piecewise": dict(mode="compile", backend="fake-compiler", debug=True, graph_mode="piecewise",
                      capture_sizes=SIZES),
    # The fake capture (a dispatch mode) cannot run Dynamo's code: full graphs of the eager model.
    "full": dict(mode="eager", graph_mode="full", capture_sizes=SIZES, debug=True),
}


def main() -> None:
    """Runs in the fake-platform process: tokens and graph counts per (mode, dbo), as JSON."""
    from compiler import CompilationConfig, counters
    from tests.helpers.fake_platform import CALLS, CAPTURE_STREAMS, POOLS_USED
    from models.loader import load_model
    from models.testing import write_tiny_checkpoint
    from runtime import LLM
    from runtime.contracts.sampling_params import SamplingParams

    prompts = [[5, 9, 13, 2, 77], list(range(30, 60)), [101], [7, 7, 7]] + [[i, 3 * i % 250] for i in range(9)]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint("LlamaForCausalLM", tmp)
        for name, cfg in MODES.items():
            for dbo in (False, True):
                counters.reset()
                CALLS.clear()
                CAPTURE_STREAMS.clear()
                POOLS_USED.clear()
                loaded = load_model(path, dtype="float32", device="cpu", compilation_config=CompilationConfig(**cfg))
                llm = LLM.from_loaded(loaded, max_num_seqs=16, max_model_len=128, num_kv_blocks=128,
                                      max_num_batched_tokens=32, enable_dbo=dbo, force_dbo=dbo,
                                      dbo_decode_token_threshold=4, dbo_prefill_token_threshold=8)
                captured = counters.graphs_captured
                runner = llm.engine.executor.worker.runner
                # Per capture: (its pool, its stream) as indices of the runner's pools / slot streams.
                pools = [runner.graphs.runtime.pool, *(rt.pool for rt in runner.graphs.ubatch_runtimes)]
                streams = [None, *runner.ubatch_streams]
                placement = sorted({(next(i for i, p in enumerate(pools) if p is pool),
                                     next(i for i, s in enumerate(streams) if s is stream))
                                    for pool, stream in zip(POOLS_USED, CAPTURE_STREAMS)})
                tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                report[f"{name},{dbo}"] = dict(tokens=tokens, captured=captured, replays=counters.graph_replays,
                                               dbo_steps=llm.engine.executor.worker.runner.dbo_steps,
                                               waits=CALLS["stream_wait_event"], placement=placement)
    json.dump(report, sys.stdout)


@pytest.fixture(scope="module")
def report() -> dict:
    from tests.helpers.fake_platform import run_with_fake_platform

    return run_with_fake_platform("import tests.runtime.worker.test_dbo_fake_graphs as t; t.main()")


@pytest.mark.parametrize("mode", list(MODES))
def test_dbo_with_graphs_gives_the_tokens_of_dbo_off(report, mode):
    off, on = report[f"{mode},False"], report[f"{mode},True"]
    assert off["dbo_steps"] == 0 and on["dbo_steps"] > 0
    assert on["tokens"] == off["tokens"]
    # Micro-batch streams follow each other at every hand-off and the caller's stream joins them.
    assert on["waits"] > off["waits"]


@pytest.mark.parametrize("mode", list(MODES))
def test_each_micro_batch_slot_captures_and_replays_its_own_graphs(report, mode):
    off, on = report[f"{mode},False"], report[f"{mode},True"]
    # 32 tokens at most per step: a micro-batch holds up to 16, so both slots capture every piecewise
    # size; full graphs (uniform decode, 16 sequences at most) go up to 8 sequences per micro-batch.
    per_slot = {"piecewise": off["captured"], "full": off["captured"] - 1}[mode]
    assert off["captured"] > 0 and on["captured"] == off["captured"] + 2 * per_slot
    assert on["replays"] > 0
    # Whole-step graphs: the shared pool, the platform's capture stream. Slot i: its own pool,
    # captured on its own stream (the slots replay concurrently; nothing they write is shared).
    assert off["placement"] == [[0, 0]]
    assert on["placement"] == [[0, 0], [1, 1], [2, 2]]
