"""Qwen2-VL against transformers on a tiny random checkpoint: logits, greedy tokens, engine, compilation."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from compiler import CompilationConfig, counters
from models.loader import load_model
from models.mrope import prompt_positions
from models.qwen2_vl import MultimodalStep
from models.vision_testing import TINY_IMAGE_TOKEN as IMG, TINY_VISION_END as VE, TINY_VISION_START as VS
from models.vision_testing import write_tiny_qwen2_vl_checkpoint
from runtime.attention.kv_tensors import allocate_kv_caches
from runtime.attention.metadata import AttentionMetadata
from runtime.forward_context import set_forward_context

PATCH_DIM = 3 * 2 * 14 * 14
ONE_IMAGE = ([(1, 4, 6)], [5, 6, VS] + [IMG] * 6 + [VE, 7, 8, 9])
TWO_IMAGES = ([(1, 4, 6), (1, 8, 4)], [5, VS] + [IMG] * 6 + [VE, 7, VS] + [IMG] * 8 + [VE, 9, 10, 11])
COMPILED = {"mode": "compile", "backend": "eager"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_qwen2_vl_checkpoint(str(tmp_path_factory.mktemp("qwen2vl")))


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _pixels(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM, generator=g)


def _hf_inputs(ids, pixels, grids):
    x = torch.tensor([ids])
    return dict(input_ids=x, pixel_values=pixels, image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=(x == IMG).int())


def _our_logits(model, ids, pixels, grids):
    """One prefill through the paged attention op, images merged by the named merge op."""
    positions, _ = prompt_positions(ids, IMG, grids, 2)
    rows = torch.tensor([i for i, t in enumerate(ids) if t == IMG])
    step = MultimodalStep.from_rows(rows, torch.cat(model.encode_images(pixels, grids)), len(ids))
    kv = allocate_kv_caches(model, 8, 16, torch.float32, "cpu")
    md = AttentionMetadata.build([len(ids)], [len(ids)], [[0, 1, 2, 3]], 16)
    with torch.inference_mode(), set_forward_context(md, kv):
        return model.compute_logits(model(torch.tensor(ids), positions, images=step))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_logits_match_transformers_one_and_two_images(checkpoint, hf_model, compiled):
    config = CompilationConfig(**COMPILED) if compiled else None
    model = load_model(checkpoint, dtype="float32", device="cpu", compilation_config=config).model
    for grids, ids in (ONE_IMAGE, TWO_IMAGES):
        pixels = _pixels(grids)
        with torch.no_grad():
            ref = hf_model(**_hf_inputs(ids, pixels, grids)).logits[0]
        ours = _our_logits(model, ids, pixels, grids)
        err = (ours - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-4, f"{len(grids)} image(s): relative logit error {err:.1e}"
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_images_change_the_logits(checkpoint):
    """The comparison above would pass vacuously if images had no effect on the output."""
    model = load_model(checkpoint, dtype="float32", device="cpu").model
    grids, ids = ONE_IMAGE
    a = _our_logits(model, ids, _pixels(grids, seed=0), grids)
    b = _our_logits(model, ids, _pixels(grids, seed=1), grids)
    assert (a - b).abs().max() > 1e-2


def _image(h, w, seed):
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compiled_llm(checkpoint, tmp_path_factory):
    from runtime import LLM

    dump = str(tmp_path_factory.mktemp("dumps"))
    # 16-token steps: a two-image prompt (25 tokens) is prefilled in two chunks.
    llm = LLM(checkpoint, dtype="float32", max_num_batched_tokens=16, max_model_len=256, max_num_seqs=4,
              max_image_patches=256, compilation_config=dict(COMPILED, dump_dir=dump))
    return llm, dump


def test_engine_greedy_matches_transformers_generate_with_chunked_prefill(compiled_llm, hf_model):
    from runtime.contracts.sampling_params import SamplingParams

    llm, _ = compiled_llm
    images = [_image(56, 84, 0), _image(112, 56, 1)]
    prompts = [{"prompt": [5, 6, VS, IMG, VE, 7, 8, VS, IMG, VE, 9], "images": images},
               {"prompt": [3, VS, IMG, VE, 4], "images": images[1:]},
               [10, 11, 12]]
    encoder = llm.engine.executor.worker.runner.multimodal.encoder
    runs_before = encoder.runs
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert encoder.runs - runs_before == 2, "each image request runs the encoder once, whatever its chunks"
    assert not llm.engine.executor.worker.runner.multimodal.cache, "encoder outputs are dropped once the prefill passed them"
    for prompt, out in zip(prompts, outs):
        if isinstance(prompt, dict):
            ids, mm = llm.engine.input_processor.process(prompt["prompt"], prompt["images"])
            pixels, grids = torch.cat([i.pixel_values for i in mm.images]), [i.grid for i in mm.images]
            kwargs = _hf_inputs(ids, pixels, grids)
        else:
            ids, kwargs = prompt, dict(input_ids=torch.tensor([prompt]))
        ref = hf_model.generate(**kwargs, max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref
        assert len(out.prompt_token_ids) == len(ids)


def test_encoder_and_decoder_have_separate_traces_and_dumps(compiled_llm):
    llm, dump = compiled_llm
    manifests = {tag: json.load(open(os.path.join(dump, tag, "manifest.json"))) for tag in ("decoder", "encoder")}
    # The encoder is one graph (its attention is no splitting op), one op per ViT block; the
    # decoder is split at its paged attention op and never sees the encoder's.
    encoder_ops = [p["op_counts"] for p in manifests["encoder"]["pieces"]]
    assert len(encoder_ops) == 1 and encoder_ops[0]["graphmode::encoder_attention"] == 2
    decoder_pieces = manifests["decoder"]["pieces"]
    assert sum(p["is_splitting_op"] for p in decoder_pieces) == 2
    assert not any("graphmode::encoder_attention" in p["op_counts"] for p in decoder_pieces)
    assert [m["tag"] for m in manifests.values()] == ["decoder", "encoder"]
    by_tag = manifests["decoder"]["counters"]["traces_by_tag"]  # snapshot when the decoder was traced
    assert by_tag["decoder"] >= 1 and by_tag["encoder"] >= 1
    runner = llm.engine.executor.worker.runner.multimodal.encoder
    traces, encoder_traces = counters.dynamo_traces, counters.traces_by_tag["encoder"]
    for i, (h, w) in enumerate([(56, 56), (56, 112), (84, 140), (112, 112), (28 * 6, 28 * 4)]):
        pixels = _pixels([(1, h // 14, w // 14)], seed=i)
        out = runner.run(pixels, [(1, h // 14, w // 14)])
        assert out.shape == (h // 28 * (w // 28), 64)
    assert counters.dynamo_traces == traces, "a new image size must not re-trace the encoder"
    assert counters.traces_by_tag["encoder"] == encoder_traces


def test_image_request_errors(compiled_llm):
    llm, _ = compiled_llm
    with pytest.raises(ValueError, match="placeholder"):
        llm.generate({"prompt": [5, VS, IMG, VE], "images": [_image(56, 56, 0)] * 2}, use_tqdm=False)
    ids, mm = llm.engine.input_processor.process([5, VS, IMG, VE], [_image(28 * 20, 28 * 30, 0)])
    assert mm.images[0].num_patches <= 256, "an image above max_image_patches is resized down to it"
    too_big = dataclasses.replace(mm.images[0], pixel_values=torch.zeros(1600, PATCH_DIM), grid=(1, 40, 40))
    with pytest.raises(ValueError, match="max_image_patches"):
        llm.engine.input_processor.check(dataclasses.replace(mm, images=[too_big]))


def test_encoder_compilation_off_leaves_decoder_compiled(checkpoint):
    config = CompilationConfig(mode="compile", backend="eager", encoder=CompilationConfig(mode="eager"))
    model = load_model(checkpoint, dtype="float32", device="cpu", compilation_config=config).model
    assert model.visual._compiled_forward is None
    assert model.model.language_model._compiled_forward is not None
    assert model.visual.compilation_config.mode == "eager"


def test_memory_profile_runs_encoder_at_largest_budget_and_the_merge(compiled_llm, monkeypatch):
    import models.qwen2_vl as qwen2_vl

    llm, _ = compiled_llm
    runner = llm.engine.executor.worker.runner
    encoder_batches, merged_rows = [], []
    run = runner.multimodal.encoder.run
    monkeypatch.setattr(runner.multimodal.encoder, "run",
                        lambda pixels, grids: encoder_batches.append(pixels.shape[0]) or run(pixels, grids))
    merge = qwen2_vl.merge_image_embeddings
    monkeypatch.setattr(qwen2_vl, "merge_image_embeddings",
                        lambda e, is_image, image: merged_rows.append(int(is_image.sum())) or merge(e, is_image, image))
    from runtime.worker.kv_sizing import profile_peak_bytes

    profile_peak_bytes(runner)
    assert encoder_batches == [256], "one encoder batch at max_image_patches"
    assert merged_rows == [16], "its 64 merged rows fill the whole 16-token profile step"


def test_transformers_v4_checkpoint_names_map_onto_the_model():
    from models.loader import build_model
    from models.vision_testing import tiny_qwen2_vl_config

    model = build_model(tiny_qwen2_vl_config(), torch.float32, "cpu", init=False)
    resolve = model.weights.resolve
    assert resolve("visual.blocks.0.attn.qkv.weight").param == "model.visual.blocks.0.attn.qkv.weight"
    q = resolve("model.layers.1.self_attn.q_proj.bias")
    assert q.param == "model.language_model.layers.1.self_attn.qkv_proj.bias" and q.index == (slice(0, 64),)
    assert resolve("model.embed_tokens.weight").param == "model.language_model.embed_tokens.weight"
    assert resolve("model.language_model.norm.weight").param == "model.language_model.norm.weight"
    assert resolve("lm_head.weight").param == "lm_head.weight"  # this config does not tie the head
