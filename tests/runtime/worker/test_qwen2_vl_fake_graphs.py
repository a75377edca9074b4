"""Qwen2-VL with decoder and encoder static graphs, on the fake device platform (tests/fake_platform.py,
whose graphs replay recorded work on the captured tensors): greedy tokens equal eager.

Decode steps run graphs captured at a padded size, so the step buffers a graph reads (M-RoPE positions,
image rows) must sit where a step with fewer tokens wrote them: a layout that moved with the token count
gave the H100 run of tests/gpu/test_vision_gpu.py different tokens, and gives them here too.
"""
from __future__ import annotations

import json
import sys
import tempfile

import pytest


def main() -> None:
    """Runs in the fake-platform process; prints eager and graph tokens as JSON."""
    import torch

    from compiler import CompilationConfig, counters
    from models.vision_testing import (TINY_IMAGE_TOKEN, TINY_VISION_END, TINY_VISION_START,
                                       write_tiny_qwen2_vl_checkpoint)
    from runtime import LLM
    from runtime.contracts.sampling_params import SamplingParams

    path = write_tiny_qwen2_vl_checkpoint(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8, generator=g),
              torch.randint(0, 256, (112, 56, 3), dtype=torch.uint8, generator=g)]
    image = [TINY_VISION_START, TINY_IMAGE_TOKEN, TINY_VISION_END]
    prompts = [{"prompt": [5, *image, 7, *image, 9], "images": images},
               {"prompt": [3, *image, 4], "images": images[:1]}, [10, 11, 12, 13]]
    params = SamplingParams(temperature=0, max_tokens=12)
    common = dict(dtype="float32", max_num_batched_tokens=16, max_model_len=256, max_num_seqs=4,
                  max_image_patches=256, num_kv_blocks=64)
    report = {"eager": [o.outputs[0].token_ids for o in LLM(path, **common).generate(prompts, params, use_tqdm=False)]}
    graphs = CompilationConfig(mode="compile", backend="eager", graph_mode="full_and_piecewise",
                               capture_sizes=[1, 2, 4, 8, 16],
                               encoder=CompilationConfig(mode="compile", backend="eager", graph_mode="full",
                                                         capture_sizes=[64, 128]))
    counters.reset()
    outs = LLM(path, compilation_config=graphs, **common).generate(prompts, params, use_tqdm=False)
    report.update(graphs=[o.outputs[0].token_ids for o in outs], replays=counters.graph_replays)
    json.dump(report, sys.stdout)


@pytest.fixture(scope="module")
def report() -> dict:
    from tests.helpers.fake_platform import run_with_fake_platform

    return run_with_fake_platform("import tests.runtime.worker.test_qwen2_vl_fake_graphs as t; t.main()")


def test_decoder_and_encoder_graphs_give_the_eager_tokens(report):
    assert report["replays"] > 0
    assert report["graphs"] == report["eager"]
