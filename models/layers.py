"""Building blocks of the decoder models, in plain PyTorch.

Written the way transformers-style code is written (``x * torch.rsqrt(...)``, ``F.silu(g) * u``)
so that the compiler's passes, not the model, decide what gets fused.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import runtime.attention.op  # noqa: F401  (registers graphmode::attention)
from models.parallel_layers import ColumnParallelLinear, RowParallelLinear, Shard, even_shard, head_shards
from runtime.distributed.parallel_state import current_parallel


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _llama3_scale(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor = params["factor"]
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding over a precomputed cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self._table_args = (max_positions, theta, scaling)
        self.register_buffer("cos_sin_cache", self._table(), persistent=False)

    def _table(self) -> torch.Tensor:
        max_positions, theta, scaling = self._table_args
        inv_freq = rope_inv_freq(self.head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def rebuild_buffers(self) -> None:
        """Recompute the table after the module was built on the meta device."""
        self.cos_sin_cache = self._table().to(self.cos_sin_cache.device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], -1, self.head_dim)
        cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).view(shape)


class Attention(nn.Module):
    """Self-attention with fused QKV; the attention itself is the ``graphmode::attention`` op."""

    def __init__(
        self,
        layer_name: str,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        qkv_bias: bool = False,
        qk_norm_eps: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.layer_name = layer_name
        # Under tensor parallelism this rank holds some of the heads (see head_shards); the sizes
        # below are this rank's.
        heads = head_shards(num_heads, num_kv_heads, current_parallel())
        self.num_heads, self.num_kv_heads, self.head_dim = heads.q.count, heads.kv.count, head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window or 0
        q_rows, kv_rows = _times(heads.q, head_dim), _times(heads.kv, head_dim)
        self.qkv_proj = ColumnParallelLinear(hidden_size, [q_rows, kv_rows, kv_rows], bias=qkv_bias)
        self.o_proj = RowParallelLinear(q_rows, hidden_size, bias=False)
        self.rotary = rotary
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
        q, k = self.rotary(positions, q, k)
        out = torch.empty(num_tokens, self.num_heads, self.head_dim, dtype=x.dtype, device=x.device)
        torch.ops.graphmode.attention(
            q.reshape(num_tokens, self.num_heads, self.head_dim),
            k.reshape(num_tokens, self.num_kv_heads, self.head_dim),
            v.reshape(num_tokens, self.num_kv_heads, self.head_dim),
            out, self.layer_name, self.scale, self.sliding_window,
        )
        return self.o_proj(out.view(num_tokens, self.q_size))


class GatedMLP(nn.Module):
    """SwiGLU MLP with fused gate/up projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        parallel = current_parallel()
        inter = even_shard(intermediate_size, parallel.rank, parallel.world_size)
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _times(heads: Shard, head_dim: int) -> Shard:
    """A shard of heads as a shard of projection rows."""
    return Shard(heads.full * head_dim, heads.start * head_dim, heads.count * head_dim)
