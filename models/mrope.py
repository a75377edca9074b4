"""Multimodal rotary embedding (M-RoPE, Qwen2-VL): three position streams (time, height, width).

Every token carries three positions. Text tokens use the same value in all three; an image's
tokens use (t, row, column) of their place in the merged patch grid, offset by the text before
them. The rotary frequencies are split in three sections (``mrope_section``), each rotated by one
of the three streams; after the prompt, decode positions are ``p + delta`` for all three streams.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import rope_inv_freq


class MRotaryEmbedding(nn.Module):
    """Neox-style rotary whose cos/sin columns come from the t/h/w stream of their section."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, mrope_section: list[int]) -> None:
        super().__init__()
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must add up to head_dim / 2 = {head_dim // 2}")
        self.head_dim = head_dim
        self.mrope_section = list(mrope_section)
        self._table_args = (max_positions, theta)
        self.register_buffer("cos_sin_cache", self._table(), persistent=False)

    def _table(self) -> torch.Tensor:
        max_positions, theta = self._table_args
        inv_freq = rope_inv_freq(self.head_dim, theta, None)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def rebuild_buffers(self) -> None:
        self.cos_sin_cache = self._table().to(self.cos_sin_cache.device)

    def _sectioned(self, table: torch.Tensor) -> torch.Tensor:
        """[3, T, half] -> [T, half]: section i takes its columns from stream i."""
        parts = table.split(self.mrope_section, dim=-1)
        return torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T]; q/k [T, heads * head_dim] or [T, heads, head_dim]."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # each [3, T, half]
        cos, sin = self._sectioned(cos), self._sectioned(sin)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, self.head_dim)
        cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).view(shape)


def image_positions(start: int, grid_thw: tuple[int, int, int], merge_size: int) -> torch.Tensor:
    """[3, t * h/m * w/m] M-RoPE positions of one image's tokens, placed after ``start`` positions."""
    t, h, w = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def prompt_positions(token_ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]],
                     merge_size: int) -> tuple[torch.Tensor, int]:
    """([3, len(token_ids)] positions of a prompt, delta for the tokens after it).

    Each run of image tokens is one image (in order of ``grids``); text continues after the
    largest position an image used.
    """
    ids = torch.tensor(token_ids)
    is_image = (ids == image_token_id).tolist()
    pieces, pos, i, image = [], 0, 0, 0
    while i < len(token_ids):
        j = i
        while j < len(token_ids) and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        if image >= len(grids):
            raise ValueError(f"prompt has more image placeholder runs than the {len(grids)} image(s) given")
        grid = grids[image]
        n = grid[0] * (grid[1] // merge_size) * (grid[2] // merge_size)
        if j - i < n:
            raise ValueError(f"image {image} needs {n} placeholder tokens, the prompt has a run of {j - i}")
        pieces.append(image_positions(pos, grid, merge_size))
        pos += max(grid[1], grid[2]) // merge_size
        image += 1
        i += n  # two adjacent images form one run: the next loop turn starts the next image
    if image != len(grids):
        raise ValueError(f"prompt has {image} image placeholder run(s) for {len(grids)} image(s)")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.int64)
    return positions, int(positions.max()) + 1 - len(token_ids) if len(token_ids) else 0
