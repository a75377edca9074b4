"""Per-step multimodal inputs for the model runner: M-RoPE positions, encoder runs, cached outputs.

For a model with ``supports_images`` the runner calls ``prepare`` every step. It

- writes every scheduled token's three M-RoPE positions into the model's persistent buffer
  (prompt positions come from the request's ``MultimodalPrompt``; later tokens are ``p + delta``;
  text-only requests use ``p`` three times);
- runs the encoder for a request the first time one of its chunks reaches an image placeholder
  and caches the output per request, so the following chunks of a chunked prefill reuse it; the
  entry is dropped once the prefill has passed the last image (a preempted request that restarts
  runs the encoder again);
- marks the rows of this step's flat token batch that take image embeddings and writes those
  embeddings in place (every other row is unmarked, so the merge in the forward is a no-op there).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from compiler.config import CompilationConfig
from models.qwen2_vl_processing import MultimodalPrompt, Qwen2VLInputProcessor
from runtime.platforms import current_platform
from runtime.worker.encoder_runner import EncoderRunner

logger = logging.getLogger(__name__)


class MultimodalRunner:
    def __init__(self, model: Any, max_tokens: int, max_image_patches: int, device: torch.device,
                 decoder_config: CompilationConfig | None = None) -> None:
        self.model, self.device = model, device
        self.encoder = EncoderRunner(model.visual, max_image_patches, device, decoder_config)
        self.merge_unit = model.merge_size ** 2
        self.buffers = model.allocate_step_buffers(max_tokens)
        # request id -> (request, encoder output per image); finished requests are pruned each step.
        self.cache: dict[str, tuple[Any, list[torch.Tensor]]] = {}

    @property
    def max_image_patches(self) -> int:
        return self.encoder.max_patches

    # ---- per step ----------------------------------------------------------------------------
    def prepare(self, scheduled: list[Any], num_tokens: int) -> None:
        """Fill the model's step buffers for this step's flat tokens."""
        for request_id in [r for r, (req, _) in self.cache.items() if req.is_finished]:
            del self.cache[request_id]  # aborted mid-prefill
        positions, rows, embeds, offset = [], [], [], 0
        for item in scheduled:
            req, start = item.request, item.start_pos
            end = start + item.num_new_tokens
            mm: MultimodalPrompt | None = getattr(req, "multimodal", None)
            positions.append(_chunk_positions(mm, start, end))
            if mm is not None:
                self._image_rows(req, mm, start, end, offset, rows, embeds)
            offset += end - start
        buffers = self.buffers
        host_positions = current_platform.pinned(torch.cat(positions, dim=1))  # pageable would wait for the device
        buffers.mrope_positions(num_tokens).copy_(host_positions, non_blocking=True)
        buffers.is_image[:num_tokens].fill_(False)
        if rows:
            index = current_platform.pinned(torch.cat(rows)).to(self.device, non_blocking=True)
            buffers.is_image[index] = True
            buffers.image_embeds[index] = torch.cat(embeds).to(buffers.image_embeds.dtype)

    def _image_rows(self, req: Any, mm: MultimodalPrompt, start: int, end: int, offset: int,
                    rows: list[torch.Tensor], embeds: list[torch.Tensor]) -> None:
        overlapping = [i for i, (s, e) in enumerate(mm.spans) if s < end and e > start]
        if not overlapping:
            return
        entry = self.cache.get(req.request_id)
        if entry is None:
            entry = self.cache[req.request_id] = (req, self._encode(mm))
        outputs = entry[1]
        for i in overlapping:
            s, e = mm.spans[i]
            lo, hi = max(s, start), min(e, end)
            rows.append(torch.arange(lo, hi) - start + offset)
            embeds.append(outputs[i][lo - s:hi - s])
        if end >= mm.spans[-1][1]:
            self.cache.pop(req.request_id, None)  # prefill is past the last image

    def _encode(self, mm: MultimodalPrompt) -> list[torch.Tensor]:
        """Encoder outputs per image, packing as many images per encoder batch as the budget holds."""
        outputs: list[torch.Tensor] = []
        batch: list = []
        for image in mm.images + [None]:
            full = image is None or sum(i.num_patches for i in batch) + image.num_patches > self.max_image_patches
            if batch and full:
                merged = self.encoder.run(torch.cat([i.pixel_values for i in batch]), [i.grid for i in batch])
                outputs.extend(merged.split([i.num_patches // self.merge_unit for i in batch]))
                batch = []
            if image is not None:
                batch.append(image)
        return outputs

    # ---- start-up ----------------------------------------------------------------------------
    def prepare_profile(self, num_tokens: int) -> None:
        """For the memory profile: the encoder at the largest budget, its output merged into the step."""
        pixels, grids = self.encoder.dummy_batch(self.max_image_patches)
        merged = self.encoder.run(pixels, grids)
        k = min(merged.shape[0], num_tokens)
        self.buffers.mrope_positions(num_tokens).zero_()
        self.buffers.is_image[:num_tokens].fill_(False)
        self.buffers.is_image[:k].fill_(True)
        self.buffers.image_embeds[:k].copy_(merged[:k])


def _chunk_positions(mm: MultimodalPrompt | None, start: int, end: int) -> torch.Tensor:
    """[3, end - start] M-RoPE positions of tokens start..end of one request."""
    if mm is None:
        return torch.arange(start, end).expand(3, -1)
    prompt_len = mm.mrope_positions.shape[1]
    parts = []
    if start < prompt_len:
        parts.append(mm.mrope_positions[:, start:min(end, prompt_len)])
    if end > prompt_len:
        parts.append(torch.arange(max(start, prompt_len), end).expand(3, -1) + mm.mrope_delta)
    return torch.cat(parts, dim=1)


def attach_multimodal(runner: Any, loaded: Any, config: Any) -> None:
    """Give ``runner`` a MultimodalRunner when the model takes images (before the memory profile,
    which runs the encoder at its largest budget)."""
    if not getattr(loaded.model, "supports_images", False):
        return
    processor = Qwen2VLInputProcessor(loaded.config, loaded.checkpoint.directory if loaded.checkpoint else None,
                                      config.max_image_patches)
    runner.multimodal = MultimodalRunner(loaded.model, runner.max_num_tokens, processor.max_image_patches,
                                         runner.device, config.compilation_config)
    logger.info("vision encoder: patch budgets %s, images up to %d patches", runner.multimodal.encoder.budgets,
                runner.multimodal.max_image_patches)
