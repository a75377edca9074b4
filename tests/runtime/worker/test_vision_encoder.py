"""The vision encoder's pieces: attention backends on packed images, padded budgets, image reading and preprocessing."""
from __future__ import annotations

import base64
import io
import logging
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from compiler import CompilationConfig, counters
from models.qwen2_vl_processing import Qwen2VLInputProcessor, smart_resize
from models.qwen2_vl_vision import VisionTransformer, encoder_inputs
from models.vision_images import ImageError, decode_data_url, load_image
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
def _encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, format=fmt)
    return buf.getvalue()


def _mixed_images() -> list[bytes]:
    """Six encoded images of mixed sizes, formats and colour modes."""
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    rgba = np.concatenate([rgb(90, 60), rng.integers(0, 256, (90, 60, 1), dtype=np.uint8)], axis=-1)
    return [_encoded(rgb(56, 84), "PNG"), _encoded(rgb(333, 500), "JPEG"), _encoded(rgba, "PNG"),
            _encoded(rgb(128, 40), "PNG", mode="L"), _encoded(rgb(700, 1200), "JPEG", mode="L"),
            _encoded(rgb(64, 64), "WEBP")]


def test_pixel_values_equal_transformers_processor_output():
    from models.qwen2_vl_processing import image_processor_class

    config = tiny_qwen2_vl_config()
    processor = Qwen2VLInputProcessor(config, None)
    reference = image_processor_class()(patch_size=14, temporal_patch_size=2, merge_size=2)
    for data in _mixed_images():
        ours = processor.preprocess([load_image(data)])[0]
        ref = reference(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
        assert ours.grid == tuple(ref["image_grid_thw"][0].tolist())
        assert torch.equal(ours.pixel_values, ref["pixel_values"].float())


def test_patch_budget_resizes_large_images_down():
    config = tiny_qwen2_vl_config()
    processor = Qwen2VLInputProcessor(config, None, max_image_patches=256)
    patches = processor.preprocess([load_image(_encoded(np.zeros((700, 1200, 3), np.uint8), "PNG"))])[0]
    assert patches.num_patches <= 256 and patches.grid[1] % 2 == 0 == patches.grid[2] % 2
    assert smart_resize(100, 70, 28, 56 * 56, 28 * 28 * 1280) == (112, 56)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_bad_images_are_one_line_errors():
    with pytest.raises(ImageError, match=r"10000x10000 = 100000000 pixels; at most \d+ are accepted"):
        load_image(_png_header_only(10000, 10000))
    with pytest.raises(ImageError, match="image is too large .*decompression bomb"):
        load_image(_png_header_only(30000, 30000))
    jpeg = _encoded(np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(ImageError, match="JPEG data is truncated or corrupt"):
        load_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageError, match="not an image file"):
        load_image(b"GIF89a but not really")
    with pytest.raises(ImageError, match="base64"):
        decode_data_url("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="does not exist"):
        load_image("/no/such/image.png")


def test_images_load_from_every_input_kind(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (10, 7, 3), dtype=np.uint8)
    png = _encoded(array, "PNG")
    (tmp_path / "x.png").write_bytes(png)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    for source in (array, torch.from_numpy(array), array.astype(np.float32) / 255.0, png, url,
                   str(tmp_path / "x.png"), Image.fromarray(array)):
        assert np.array_equal(np.asarray(load_image(source).convert("RGB")), array)
    with pytest.raises(ImageError, match="channels"):
        load_image(np.zeros((4, 4, 2), np.uint8))
