"""Chat requests with images (OpenAI ``image_url`` parts, base64 data: URLs) through the ``openai`` client."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from models.vision_testing import write_tiny_qwen2_vl_checkpoint, write_tiny_qwen2_vl_tokenizer
from tests.helpers.serve import running_server

openai = pytest.importorskip("openai")

ENGINE_ARGS = ("--served-model-name", "tiny-vl", "--dtype", "float32", "--max-image-patches", "256",
               "--max-num-batched-tokens", "32")
IMAGE = torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
_PNG = io.BytesIO()
Image.fromarray(IMAGE.numpy()).save(_PNG, format="PNG")
DATA_URL = "data:image/png;base64," + base64.b64encode(_PNG.getvalue()).decode()
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": DATA_URL}}]}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2vl-serve"))
    write_tiny_qwen2_vl_checkpoint(path)
    return write_tiny_qwen2_vl_tokenizer(path)


@pytest.fixture(scope="module")
def client(checkpoint):
    with running_server("--model", checkpoint, *ENGINE_ARGS) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120.0)


def _offline_greedy(checkpoint: str, max_tokens: int) -> tuple[list[int], int]:
    """The same request through the offline engine: (completion token ids, prompt length)."""
    from runtime import LLM
    from runtime.contracts.sampling_params import SamplingParams

    llm = LLM(checkpoint, dtype="float32", max_image_patches=256, max_model_len=512, max_num_seqs=2)
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is this?<|vision_start|>"
                                               "<|image_pad|><|vision_end|>"}], tokenize=False,
                                             add_generation_prompt=True)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    out = llm.generate({"prompt": ids, "images": [IMAGE]}, SamplingParams(temperature=0, max_tokens=max_tokens),
                       use_tqdm=False)[0]
    return out.outputs[0].token_ids, len(out.prompt_token_ids)


def test_chat_with_an_image_matches_the_offline_engine(client, checkpoint):
    resp = client.chat.completions.create(model="tiny-vl", messages=MESSAGES, temperature=0, max_tokens=6,
                                          logprobs=True)
    tokens, prompt_len = _offline_greedy(checkpoint, 6)
    # 56x84 pixels -> 4x6 patches -> 6 image tokens after the 2x2 merge, in place of one placeholder.
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.usage.completion_tokens == len(tokens)
    served = [lp.token for lp in resp.choices[0].logprobs.content]
    assert len(served) == len(tokens)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert served == [tok.decode([t]) for t in tokens]


def test_image_url_that_is_not_a_data_url_is_a_400(client):
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="data: URLs"):
        client.chat.completions.create(model="tiny-vl", messages=bad, max_tokens=2)


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels over a few bytes of data (a decompression bomb)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", ["bomb", "truncated-jpeg"])
def test_a_decompression_bomb_or_a_truncated_jpeg_is_a_400_naming_it(client, kind):
    if kind == "bomb":
        url, expected = "data:image/png;base64," + base64.b64encode(_bomb_png(30000, 30000)).decode(), "too large"
    else:
        jpeg = io.BytesIO()
        Image.fromarray(IMAGE.numpy()).save(jpeg, format="JPEG")
        data = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
        url, expected = "data:image/jpeg;base64," + base64.b64encode(data).decode(), "truncated or corrupt"
    bad = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                        {"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError, match=f"image 0: .*{expected}"):
        client.chat.completions.create(model="tiny-vl", messages=bad, max_tokens=2)
