"""The Qwen2-VL vision encoder (ViT with 2-D rotary and a 2x2 patch merger), compiled on its own.

``VisionTransformer`` is its own ``@support_torch_compile`` module with tag ``encoder``: its
dynamic dimension is the number of patches (all images of a batch packed along dim 0), which has
nothing to do with the decoder's token count, so it gets its own trace, config, cache key, dump and
static graphs. Everything data-dependent (per-patch rotary positions, image boundaries) is computed
on the host by ``encoder_inputs`` and passed in as tensors, so one trace serves every image size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compiler import support_torch_compile
from runtime.attention.encoder_attention import check_backend

DEFAULT_ENCODER_ATTENTION = "sdpa"


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu, "silu": F.silu,
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class EncoderInputs:
    """One packed encoder batch: patches of every image plus their host-built metadata."""
    pixel_values: torch.Tensor  # [patches, channels * temporal_patch * patch * patch]
    position_ids: torch.Tensor  # [patches, 2] int64: (row, column) of each patch, merge-block major
    cu_seqlens: torch.Tensor  # [frames + 1] int32: boundaries of each image frame
    grids: tuple[tuple[int, int, int], ...]  # (t, h, w) per image, in patches

    @property
    def num_patches(self) -> int:
        return self.pixel_values.shape[0]


def patch_positions(grid: tuple[int, int, int], merge_size: int) -> torch.Tensor:
    """[t*h*w, 2] (row, column) per patch, ordered merge-block by merge-block like the processor."""
    t, h, w = grid
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    shape = (h // merge_size, merge_size, w // merge_size, merge_size)
    rows = rows.reshape(shape).transpose(1, 2).flatten()
    cols = cols.reshape(shape).transpose(1, 2).flatten()
    return torch.stack([rows, cols], dim=-1).repeat(t, 1)


def encoder_inputs(pixel_values: torch.Tensor, grids: list[tuple[int, int, int]], merge_size: int) -> EncoderInputs:
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    if int(cu[-1]) != pixel_values.shape[0]:
        raise ValueError(f"image grids cover {int(cu[-1])} patches, pixel_values has {pixel_values.shape[0]}")
    positions = torch.cat([patch_positions(g, merge_size) for g in grids]) if grids else torch.zeros(0, 2)
    device = pixel_values.device
    return EncoderInputs(pixel_values, positions.to(device, torch.int64), cu.to(device), tuple(map(tuple, grids)))


class VisionRotary(nn.Module):
    """2-D axial rotary: a quarter of the head dim's frequencies rotate by row, a quarter by column."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        dim = self.head_dim // 2
        return 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    def rebuild_buffers(self) -> None:
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [N, 2, head_dim / 4]
        freqs = freqs.flatten(1)  # rows' frequencies, then columns'
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = check_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = torch.empty_like(q)
        torch.ops.graphmode.encoder_attention(q, k, v.contiguous(), cu_seqlens, out, self.scale, self.backend)
        return self.proj(out.view(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, act: str, backend: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads, backend)
        self.mlp = VisionMLP(dim, mlp_hidden, act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then each merge-block of patches (4 consecutive rows) through a 2-layer MLP."""

    def __init__(self, out_dim: int, dim: int, merge_size: int) -> None:
        super().__init__()
        self.merged_dim = dim * merge_size ** 2
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(),
                                 nn.Linear(self.merged_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))


@support_torch_compile(dynamic_arg_dims={"pixel_values": 0, "position_ids": 0, "cu_seqlens": 0}, tag="encoder")
class VisionTransformer(nn.Module):
    """pixel_values [patches, C*T*P*P] -> image embeddings [patches / merge_size**2, text hidden size]."""

    def __init__(self, config: Any, attention_backend: str = DEFAULT_ENCODER_ATTENTION) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = check_backend(attention_backend)
        dim, heads = config.embed_dim, config.num_heads
        self.merge_size = config.spatial_merge_size
        self.patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        self.patch_embed = nn.Module()
        # The checkpoint stores a Conv3d whose kernel equals its stride: a linear map of each patch.
        self.patch_embed.proj = nn.Conv3d(config.in_channels, dim, kernel_size=(config.temporal_patch_size,
                                          config.patch_size, config.patch_size), bias=False)
        rope = getattr(config, "rope_parameters", None) or {}
        self.rotary = VisionRotary(dim // heads, float(rope.get("rope_theta", 10000.0)))
        mlp_hidden = int(dim * config.mlp_ratio)
        self.blocks = nn.ModuleList(VisionBlock(dim, heads, mlp_hidden, config.hidden_act, attention_backend)
                                    for _ in range(config.depth))
        self.merger = PatchMerger(config.hidden_size, dim, self.merge_size)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embed.proj.weight
        x = F.linear(pixel_values.to(weight.dtype), weight.view(weight.shape[0], -1))
        cos, sin = self.rotary(position_ids)
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens)
        return self.merger(x)
