"""Images in chat requests: OpenAI ``image_url`` parts with base64 ``data:`` URLs, for vision models."""
from __future__ import annotations

from typing import Any

from PIL import Image

from models.vision_images import ImageError, load_image
from runtime.serve.errors import bad_request


def image_placeholder(core: Any) -> str | None:
    """The text a chat message carries where an image goes (Qwen2-VL: vision start, image pad,
    vision end); None when the engine's model takes no images."""
    if getattr(core, "input_processor", None) is None or core.tokenizer is None:
        return None
    cfg = core.model_config
    ids = [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id]
    return "".join(core.tokenizer.convert_ids_to_tokens(ids))


def decode_images(urls: list[str]) -> list[Image.Image]:
    """A decoded image per URL; a URL that is not a readable data: URL is a 400 naming the image and
    the problem (not base64, not an image, truncated, too many pixels)."""
    images = []
    for i, url in enumerate(urls):
        if not url.startswith("data:"):
            raise bad_request(f"image {i}: only data: URLs are accepted (this server fetches nothing)",
                              param="messages")
        try:
            images.append(load_image(url))
        except ImageError as e:
            raise bad_request(f"image {i}: {e}", param="messages") from None
    return images
