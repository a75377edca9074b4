"""Reading images into [H, W, 3] uint8 tensors: arrays, tensors, files, bytes and ``data:`` URLs.

PNG (8-bit grey / grey+alpha / RGB / RGBA, non-interlaced) is decoded here with zlib, so the
runtime needs neither Pillow nor torchvision for it; other formats (JPEG, WebP, ...) go through
Pillow when it is installed, else the error says to install it.
"""
from __future__ import annotations

import base64
import binascii
import os
import struct
import zlib
from typing import Any

import numpy as np
import torch

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> channels


class ImageError(ValueError):
    """An image that cannot be read; the message names the problem in one line."""


def load_image(image: Any) -> torch.Tensor:
    """[H, W, 3] uint8 from a tensor/array (HWC, uint8 or floats in [0, 1]), a path, bytes or a data: URL."""
    if isinstance(image, torch.Tensor):
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        return _to_rgb(torch.from_numpy(np.ascontiguousarray(image)))
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image))
    if isinstance(image, str):
        if image.startswith("data:"):
            return decode_image(decode_data_url(image))
        if not os.path.isfile(image):
            raise ImageError(f"image file {image!r} does not exist")
        with open(image, "rb") as f:
            return decode_image(f.read())
    if hasattr(image, "convert"):  # a PIL image
        return _to_rgb(torch.from_numpy(np.asarray(image.convert("RGB"))))
    raise ImageError(f"cannot read an image from a {type(image).__name__}")


def decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError("image URL must be a base64 data URL (data:image/<type>;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL is not valid base64") from None


def decode_image(data: bytes) -> torch.Tensor:
    if data.startswith(_PNG_SIGNATURE):
        return _to_rgb(decode_png(data))
    try:
        import io

        from PIL import Image
    except ImportError:
        raise ImageError("only PNG images can be decoded without Pillow; install pillow for other formats") from None
    try:
        return _to_rgb(torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad data
        raise ImageError(f"cannot decode image: {e}") from None


def _to_rgb(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 2:
        image = image[..., None]
    if image.dim() != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ImageError(f"image must be [H, W, C] with C in 1..4, got shape {tuple(image.shape)}")
    if image.dtype.is_floating_point:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise ImageError(f"image must be uint8 or float, got {image.dtype}")
    channels = image.shape[-1]
    if channels in (1, 2):  # grey (+ alpha): replicate grey, drop alpha
        image = image[..., :1].expand(*image.shape[:2], 3)
    return image[..., :3].contiguous()


def decode_png(data: bytes) -> torch.Tensor:
    """[H, W, C] uint8 of an 8-bit, non-interlaced PNG."""
    pos, idat, header = len(_PNG_SIGNATURE), [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ImageError("PNG has no IHDR or IDAT chunk")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _PNG_CHANNELS or interlace:
        raise ImageError(f"PNG with bit depth {depth}, colour type {colour}, interlace {interlace} needs Pillow")
    channels = _PNG_CHANNELS[colour]
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except zlib.error as e:
        raise ImageError(f"PNG data is corrupt ({e})") from None
    stride = width * channels
    if raw.size != height * (stride + 1):
        raise ImageError("PNG data has the wrong size for its header")
    return torch.from_numpy(_unfilter(raw.reshape(height, stride + 1), channels).reshape(height, width, channels))


def _unfilter(rows: np.ndarray, bpp: int) -> np.ndarray:
    out = np.zeros((rows.shape[0], rows.shape[1] - 1), dtype=np.int32)
    prev = np.zeros(out.shape[1], dtype=np.int32)
    for y in range(rows.shape[0]):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 1:  # sub: a running sum per channel
            cur = (np.cumsum(line.reshape(-1, bpp), axis=0) & 0xFF).reshape(-1)
        elif kind == 2:
            cur = (line + prev) & 0xFF
        else:  # average and paeth depend on the left result too: byte by byte
            cur = np.zeros_like(line)
            for x in range(line.size):
                left = cur[x - bpp] if x >= bpp else 0
                up_left = prev[x - bpp] if x >= bpp else 0
                if kind == 3:
                    pred = (left + prev[x]) >> 1
                elif kind == 4:
                    pred = _paeth(left, prev[x], up_left)
                else:
                    raise ImageError(f"PNG row filter {kind} is not valid")
                cur[x] = (line[x] + pred) & 0xFF
        out[y], prev = cur, cur
    return out.astype(np.uint8)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def encode_png(image: torch.Tensor) -> bytes:
    """An RGB uint8 [H, W, 3] tensor as PNG bytes (filter 0): for tests and examples."""
    image = _to_rgb(image)
    h, w, _ = image.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.numpy().reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (_PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
