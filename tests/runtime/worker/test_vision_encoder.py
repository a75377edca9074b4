"""The vision encoder's pieces: attention backends on packed images, padded budgets, preprocessing, PNG."""
from __future__ import annotations

import logging
import zlib

import numpy as np
import pytest
import torch

from compiler import CompilationConfig, counters
from models.qwen2_vl_processing import ImageSettings, preprocess_image, smart_resize
from models.qwen2_vl_vision import VisionTransformer, encoder_inputs
from models.vision_images import ImageError, decode_data_url, decode_png, encode_png, load_image
from models.vision_testing import tiny_qwen2_vl_config
from runtime.attention.encoder_attention import (ENCODER_ATTENTION_BACKENDS, block_diagonal_mask,
                                                 reference_packed_attention)
from runtime.worker.encoder_runner import EncoderRunner, patch_budgets

LENGTHS = [7, 16, 1, 30]  # packed images (frames) of different sizes, one of a single patch


def _qkv(seed: int = 0, heads: int = 3, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    # Scaled up so each row's softmax is far from uniform: an averaging backend cannot pass.
    return [torch.randn(n, heads, dim, generator=g) * 2 for _ in range(3)]


def _packed(backend: str, q, k, v) -> torch.Tensor:
    cu = torch.tensor([0] + LENGTHS, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out = torch.empty_like(q)
    torch.ops.graphmode.encoder_attention(q, k, v, cu, out, q.shape[-1] ** -0.5, backend)
    return out


@pytest.mark.parametrize("backend", sorted(ENCODER_ATTENTION_BACKENDS))
def test_backends_match_fp32_reference_on_packed_images(backend):
    q, k, v = _qkv()
    ref = reference_packed_attention(q, k, v, LENGTHS, q.shape[-1] ** -0.5)
    torch.testing.assert_close(_packed(backend, q, k, v), ref, atol=2e-5, rtol=2e-5)


def test_reference_check_catches_uniform_average_and_missing_mask():
    """What a broken fused kernel returns must fail the tolerance the backends are held to."""
    q, k, v = _qkv()
    ref = reference_packed_attention(q, k, v, LENGTHS, q.shape[-1] ** -0.5)
    uniform = torch.cat([v[s:s + n].mean(0, keepdim=True).expand(n, -1, -1)
                         for s, n in zip(np.cumsum([0] + LENGTHS[:-1]), LENGTHS)])
    no_mask = reference_packed_attention(q, k, v, [sum(LENGTHS)], q.shape[-1] ** -0.5)
    for wrong in (uniform, no_mask):
        assert (wrong - ref).abs().max() > 0.1


def test_block_diagonal_mask_gives_padding_its_own_segment():
    cu = torch.tensor([0, 2, 5, 8, 8], dtype=torch.int32)  # 5 real rows, 3 padding rows, an empty tail
    mask = block_diagonal_mask(cu, 8)
    assert mask[:2, :2].all() and mask[2:5, 2:5].all() and mask[5:, 5:].all()
    assert not mask[:5, 5:].any() and not mask[1, 2]


class _GraphlessPlatform:
    """The CPU platform claiming static graphs whose capture always fails: every call of the encoder
    runner then takes the padded persistent-buffer path (warm-up, failed capture, fallback)."""

    def __init__(self, base):
        self._base = base
        self.supports_static_graphs = True

    def __getattr__(self, name):
        return getattr(self._base, name)

    def graph_pool_handle(self):
        return None

    def new_graph(self):
        return object()

    def graph_capture(self, graph, pool):
        raise RuntimeError("no graphs on this test platform")


def _encoder(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    config = CompilationConfig(mode="compile", backend="eager", graph_mode="full", passes=[], **overrides)
    encoder = VisionTransformer(tiny_qwen2_vl_config().vision_config, compilation_config=config)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.1)
    return encoder.eval()


SIZES = [(2, 2), (4, 6), (8, 4), (6, 10), (12, 12)]  # patches per side: 5 image sizes


def test_padded_budgets_match_exact_size_and_never_retrace(monkeypatch, caplog):
    import runtime.worker.encoder_runner as er

    monkeypatch.setattr(er, "current_platform", _GraphlessPlatform(er.current_platform))
    encoder = _encoder(capture_sizes=[32, 64])
    decoder_config = CompilationConfig(encoder=encoder.compilation_config)
    runner = EncoderRunner(encoder, max_patches=144, device=torch.device("cpu"), decoder_config=decoder_config)
    assert runner.budgets == [32, 64, 144]
    traces = None
    for i, (h, w) in enumerate(SIZES):
        grids = [(1, h, w)]
        pixels = torch.randn(h * w, encoder.patch_dim, generator=torch.Generator().manual_seed(i))
        padded = runner.run(pixels, grids)
        inputs = encoder_inputs(pixels, grids, 2)
        with torch.inference_mode():
            exact = encoder.original_forward(inputs.pixel_values, inputs.position_ids, inputs.cu_seqlens)
        torch.testing.assert_close(padded, exact, atol=1e-5, rtol=1e-5)
        traces = counters.dynamo_traces if traces is None else traces
    assert counters.dynamo_traces == traces, "5 image sizes over 3 budgets: one encoder trace"
    assert runner.graphs.failed  # the fallback was taken, so the padded path is what ran


def test_two_images_packed_in_one_padded_batch_stay_apart(monkeypatch):
    import runtime.worker.encoder_runner as er

    monkeypatch.setattr(er, "current_platform", _GraphlessPlatform(er.current_platform))
    encoder = _encoder()
    runner = EncoderRunner(encoder, max_patches=256, device=torch.device("cpu"))
    grids = [(1, 4, 6), (1, 2, 2)]
    pixels = torch.randn(28, encoder.patch_dim, generator=torch.Generator().manual_seed(3))
    both = runner.run(pixels, grids)
    alone = [runner.run(pixels[:24], grids[:1]), runner.run(pixels[24:], grids[1:])]
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_cpu_encoder_graph_mode_degrades_with_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="runtime.worker.encoder_runner"):
        runner = EncoderRunner(_encoder(), max_patches=64, device=torch.device("cpu"))
    assert runner.graphs is None and "no static graphs" in caplog.text


def test_default_budgets_are_merge_block_multiples_up_to_the_largest_image():
    assert patch_budgets(CompilationConfig(capture_sizes=[1, 2, 3]), False, 1000, 4) == [256, 512, 1000]
    assert patch_budgets(CompilationConfig(capture_sizes=[30, 2000]), True, 1001, 4) == [32, 1004]


# ---- preprocessing and image files ------------------------------------------------------------
def test_preprocess_matches_transformers_processor_without_resize():
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
                              reason="transformers' Qwen2-VL processors need Pillow or torchvision",
                              exc_type=ImportError)  # transformers raises ImportError, not ModuleNotFound
    image = torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = pil.Qwen2VLImageProcessorPil()(images=[image.numpy()], return_tensors="pt")
    ours = preprocess_image(image, ImageSettings())
    assert ours.grid == tuple(ref["image_grid_thw"][0].tolist())
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"], atol=1e-5, rtol=1e-5)


def test_preprocess_layout_puts_each_patch_in_its_merge_block():
    # A 56x56 image whose pixel values encode their 14-px patch: (row, column) -> 10 * row + column.
    image = torch.zeros(56, 56, 3, dtype=torch.uint8)
    for r in range(4):
        for c in range(4):
            image[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = 10 * r + c
    s = ImageSettings(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    out = preprocess_image(image, s)
    assert out.grid == (1, 4, 4)
    order = out.pixel_values[:, 0].round().int().tolist()
    assert order == [0, 1, 10, 11, 2, 3, 12, 13, 20, 21, 30, 31, 22, 23, 32, 33]
    assert smart_resize(100, 70, 28, 56 * 56, 28 * 28 * 1280) == (112, 56)


def _png_with_filters(image: np.ndarray) -> bytes:
    """A PNG whose rows cycle through filters 0..4 (our encoder writes only filter 0)."""
    h, w, _ = image.shape
    raw, prev, rows = image.reshape(h, w * 3).astype(np.int32), np.zeros(w * 3, np.int32), []
    for y in range(h):
        kind, line = y % 5, raw[y]
        left = np.concatenate([np.zeros(3, np.int32), line[:-3]])
        up_left = np.concatenate([np.zeros(3, np.int32), prev[:-3]])
        pred = [np.zeros_like(line), left, prev, (left + prev) >> 1,
                np.array([_paeth(a, b, c) for a, b, c in zip(left, prev, up_left)])][kind]
        rows.append(bytes([kind]) + ((line - pred) & 0xFF).astype(np.uint8).tobytes())
        prev = line
    png = bytearray(encode_png(torch.from_numpy(image)))
    start = png.index(b"IDAT") - 4
    length = int.from_bytes(png[start:start + 4], "big")
    body = zlib.compress(b"".join(rows))
    chunk = len(body).to_bytes(4, "big") + b"IDAT" + body + zlib.crc32(b"IDAT" + body).to_bytes(4, "big")
    return bytes(png[:start]) + chunk + bytes(png[start + 12 + length:])


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def test_png_decoder_reads_every_row_filter_and_data_urls():
    import base64

    image = np.random.default_rng(0).integers(0, 256, (10, 7, 3), dtype=np.uint8)
    assert torch.equal(decode_png(encode_png(torch.from_numpy(image))), torch.from_numpy(image))
    assert torch.equal(decode_png(_png_with_filters(image)), torch.from_numpy(image))
    url = "data:image/png;base64," + base64.b64encode(encode_png(torch.from_numpy(image))).decode()
    assert torch.equal(load_image(url), torch.from_numpy(image))
    with pytest.raises(ImageError, match="base64"):
        decode_data_url("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="does not exist"):
        load_image("/no/such/image.png")
