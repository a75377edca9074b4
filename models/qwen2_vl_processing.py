"""Qwen2-VL inputs: images -> patches, and the prompt's image placeholders expanded to one token per
merged patch, with the prompt's M-RoPE positions.

Preprocessing follows transformers' Qwen2-VL image processor (``smart_resize`` to a multiple of
patch * merge within [min_pixels, max_pixels], bicubic resize, rescale, CLIP normalisation, the
frame repeated ``temporal_patch_size`` times, patches ordered merge-block by merge-block). That
processor needs torchvision (the fast one) or Pillow (the slow one), and neither is a dependency
here, so this is a torch-only implementation; tests check it against transformers' processor
where Pillow is installed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from models.mrope import prompt_positions
from models.vision_images import load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSettings:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_checkpoint(cls, vision_config: Any, directory: str | None) -> "ImageSettings":
        values: dict[str, Any] = dict(patch_size=vision_config.patch_size,
                                      temporal_patch_size=vision_config.temporal_patch_size,
                                      merge_size=vision_config.spatial_merge_size)
        path = os.path.join(directory, "preprocessor_config.json") if directory else None
        if path and os.path.isfile(path):
            with open(path) as f:
                pre = json.load(f)
            size = pre.get("size") or {}
            values["min_pixels"] = pre.get("min_pixels", size.get("shortest_edge", cls.min_pixels))
            values["max_pixels"] = pre.get("max_pixels", size.get("longest_edge", cls.max_pixels))
            values["mean"] = tuple(pre.get("image_mean", CLIP_MEAN))
            values["std"] = tuple(pre.get("image_std", CLIP_STD))
        return cls(**values)

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Sides that are multiples of ``factor``, about the same aspect ratio, area within the bounds."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be below 200, got {height}x{width}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@dataclass
class ImagePatches:
    pixel_values: torch.Tensor  # [t*h*w, patch_dim] float32
    grid: tuple[int, int, int]  # (t, h, w) in patches

    @property
    def num_patches(self) -> int:
        return self.pixel_values.shape[0]


def preprocess_image(image: Any, s: ImageSettings) -> ImagePatches:
    rgb = load_image(image)  # [H, W, 3] uint8
    height, width = rgb.shape[:2]
    factor = s.patch_size * s.merge_size
    rh, rw = smart_resize(height, width, factor, s.min_pixels, s.max_pixels)
    x = rgb.permute(2, 0, 1)[None].float()
    if (rh, rw) != (height, width):
        # Like torchvision on uint8 input: antialiased bicubic, rounded back to 8 bits.
        x = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True).round().clamp(0, 255)
    mean, std = torch.tensor(s.mean).view(1, 3, 1, 1), torch.tensor(s.std).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    gh, gw, m, p = rh // s.patch_size, rw // s.patch_size, s.merge_size, s.patch_size
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # blocks, merge, c, patch
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, s.temporal_patch_size, -1, -1)
    return ImagePatches(x.reshape(gh * gw, s.patch_dim).contiguous(), (1, gh, gw))


@dataclass
class MultimodalPrompt:
    """What a request carries for its images (set on ``Request.multimodal``)."""
    images: list[ImagePatches]
    spans: list[tuple[int, int]]  # placeholder token rows [start, end) of each image in the prompt
    mrope_positions: torch.Tensor  # [3, prompt_len] int64
    mrope_delta: int  # decode positions are p + delta

    @property
    def num_patches(self) -> int:
        return sum(i.num_patches for i in self.images)


class Qwen2VLInputProcessor:
    def __init__(self, config: Any, directory: str | None = None, max_image_patches: int | None = None) -> None:
        """``max_image_patches``: the largest image the engine takes (None: the checkpoint's max_pixels).
        Larger images are resized down to it, as the processor does for its own max_pixels."""
        settings = ImageSettings.from_checkpoint(config.vision_config, directory)
        self.max_image_patches = max_image_patches or settings.max_pixels // settings.patch_size ** 2
        self.settings = dataclasses.replace(settings, max_pixels=min(
            settings.max_pixels, self.max_image_patches * settings.patch_size ** 2))
        self.image_token_id = config.image_token_id
        self.merge = self.settings.merge_size

    def check(self, prompt: MultimodalPrompt) -> None:
        """Each image must fit the largest encoder budget (what the start-up memory profile ran)."""
        for i, image in enumerate(prompt.images):
            if image.num_patches > self.max_image_patches:
                raise ValueError(f"image {i} has {image.num_patches} patches; this engine takes at most "
                                 f"{self.max_image_patches} per image (max_image_patches)")

    def process(self, token_ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], MultimodalPrompt]:
        """Each image placeholder token (one per image, in order) becomes one token per merged patch."""
        patches = [preprocess_image(image, self.settings) for image in images]
        slots = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if len(slots) != len(patches):
            raise ValueError(f"prompt has {len(slots)} image placeholder(s) for {len(patches)} image(s)")
        ids, spans, prev = [], [], 0
        for slot, image in zip(slots, patches):
            ids.extend(token_ids[prev:slot])
            n = image.num_patches // self.merge ** 2
            spans.append((len(ids), len(ids) + n))
            ids.extend([self.image_token_id] * n)
            prev = slot + 1
        ids.extend(token_ids[prev:])
        positions, delta = prompt_positions(ids, self.image_token_id, [p.grid for p in patches], self.merge)
        return ids, MultimodalPrompt(patches, spans, positions, delta)
