"""Qwen2-VL inputs: images -> patches through transformers' Qwen2-VL image processor, and the prompt's
image placeholders expanded to one token per merged patch, with the prompt's M-RoPE positions.

What is ours: reading images (models/vision_images.py), the engine's patch budget (an image larger than
``max_image_patches`` is resized down to it, as the processor does for its own ``max_pixels``), the
placeholder expansion and the M-RoPE positions. The pixels themselves are transformers': its
torchvision-based processor where torchvision is installed, else its Pillow-based one.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from models.mrope import prompt_positions
from models.vision_images import load_image

# Qwen2-VL's processor defaults, for checkpoints that ship no preprocessor_config.json.
_DEFAULT_SETTINGS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}


def image_processor_class() -> type:
    """transformers' Qwen2-VL image processor: the torchvision one where torchvision imports, else the
    Pillow one. transformers 5 names them ``Qwen2VLImageProcessor`` / ``Qwen2VLImageProcessorPil``,
    transformers 4 ``Qwen2VLImageProcessorFast`` / ``Qwen2VLImageProcessor``."""
    try:
        import torchvision  # noqa: F401
        has_torchvision = True
    except ImportError:  # absent, or a build that does not match torch
        has_torchvision = False
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:  # transformers 4
        if has_torchvision:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl_fast import Qwen2VLImageProcessorFast

            return Qwen2VLImageProcessorFast
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    if has_torchvision:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    return Qwen2VLImageProcessorPil


def _checkpoint_settings(directory: str | None) -> dict[str, Any]:
    """min/max pixels, mean and std from the checkpoint's preprocessor_config.json, where it has one."""
    settings: dict[str, Any] = dict(_DEFAULT_SETTINGS)
    path = os.path.join(directory, "preprocessor_config.json") if directory else None
    if path and os.path.isfile(path):
        with open(path) as f:
            pre = json.load(f)
        size = pre.get("size") or {}
        settings["min_pixels"] = pre.get("min_pixels", size.get("shortest_edge", settings["min_pixels"]))
        settings["max_pixels"] = pre.get("max_pixels", size.get("longest_edge", settings["max_pixels"]))
        for key in ("image_mean", "image_std"):
            if key in pre:
                settings[key] = pre[key]
    return settings


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size transformers' processor resizes an image to (sides multiples of ``factor``)."""
    module = importlib.import_module(image_processor_class().__module__)
    return module.smart_resize(height, width, factor, min_pixels, max_pixels)


@dataclass
class ImagePatches:
    pixel_values: torch.Tensor  # [t*h*w, patch_dim] float32
    grid: tuple[int, int, int]  # (t, h, w) in patches

    @property
    def num_patches(self) -> int:
        return self.pixel_values.shape[0]


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
        vision = config.vision_config
        settings = _checkpoint_settings(directory)
        patch = vision.patch_size
        self.max_image_patches = max_image_patches or settings["max_pixels"] // patch ** 2
        settings["max_pixels"] = min(settings["max_pixels"], self.max_image_patches * patch ** 2)
        self.image_processor = image_processor_class()(
            patch_size=patch, temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size,
            **settings)
        self.image_token_id = config.image_token_id
        self.merge = vision.spatial_merge_size

    def check(self, prompt: MultimodalPrompt) -> None:
        """Each image must fit the largest encoder budget (what the start-up memory profile ran)."""
        for i, image in enumerate(prompt.images):
            if image.num_patches > self.max_image_patches:
                raise ValueError(f"image {i} has {image.num_patches} patches; this engine takes at most "
                                 f"{self.max_image_patches} per image (max_image_patches)")

    def process(self, token_ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], MultimodalPrompt]:
        """Each image placeholder token (one per image, in order) becomes one token per merged patch."""
        patches = self.preprocess([load_image(image) for image in images])
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

    def preprocess(self, images: Sequence[Any]) -> list[ImagePatches]:
        """Each image's patches, as transformers' processor makes them (resize, rescale, normalise,
        temporal repeat, patches grouped by merge block)."""
        if not images:
            return []
        out = self.image_processor(images=list(images), return_tensors="pt")
        grids = [tuple(int(v) for v in g) for g in out["image_grid_thw"].tolist()]
        pixels = out["pixel_values"].float().split([t * h * w for t, h, w in grids])
        return [ImagePatches(p, g) for p, g in zip(pixels, grids)]
