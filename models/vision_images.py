"""Reading images for vision models: files, bytes, ``data:`` URLs, arrays and tensors, through Pillow.

Every encoded format Pillow reads works (PNG, JPEG, WebP, GIF, BMP, TIFF, ...). An image is decoded
in full here, so a truncated or corrupt file is an ``ImageError`` before a request is scheduled, and
one larger than ``MAX_IMAGE_PIXELS`` is refused from its header, before anything is decompressed
(a decompression bomb: a few kilobytes that claim 30000x30000 pixels).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

# 64 Mi pixels: a 12-megapixel photo fits five times over; the processor resizes everything down to
# the encoder's patch budget anyway, so larger images only cost decode time and memory.
MAX_IMAGE_PIXELS = 64 * 2**20


class ImageError(ValueError):
    """An image that cannot be read; the message names the problem in one line."""


def load_image(image: Any) -> Image.Image:
    """A decoded Pillow image from a path, bytes, a data: URL, a Pillow image or an HWC array/tensor
    (uint8, or floats in [0, 1]). Colour modes are kept: the image processor converts to RGB."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        return _from_array(image.detach().cpu().numpy())
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image))
    if isinstance(image, str):
        if image.startswith("data:"):
            return decode_image(decode_data_url(image))
        if not os.path.isfile(image):
            raise ImageError(f"image file {image!r} does not exist")
        with open(image, "rb") as f:
            return decode_image(f.read())
    raise ImageError(f"cannot read an image from a {type(image).__name__}")


def decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError("image URL must be a base64 data URL (data:image/<type>;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL is not valid base64") from None


def decode_image(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():  # past Pillow's warning size we refuse the image ourselves, below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's own, far higher limit, checked while opening
        raise ImageError(f"image is too large ({e})") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageError("not an image file Pillow can read (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels; at most {MAX_IMAGE_PIXELS} "
                         "are accepted")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, a broken stream
        raise ImageError(f"{image.format or 'image'} data is truncated or corrupt ({e})") from None
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageError(f"image array must be HxW or HxWxC with 1, 3 or 4 channels, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ImageError(f"image array must be uint8 or float in [0, 1], got {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(array[..., 0] if mode == "L" else array), mode=mode)
