"""Allocating the paged KV cache tensors, one per attention layer of a model."""
from __future__ import annotations

import torch
from torch import nn


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """Every module that calls the attention op (it has ``layer_name`` and head geometry)."""
    return [m for m in model.modules() if hasattr(m, "layer_name") and hasattr(m, "num_kv_heads")]


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * layer.num_kv_heads * layer.head_dim * itemsize for layer in attention_layers(model))


def allocate_kv_caches(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device | str) -> dict[str, torch.Tensor]:
    """layer name -> zeroed tensor [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    return {
        layer.layer_name: torch.zeros(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim,
                                      dtype=dtype, device=device)
        for layer in attention_layers(model)
    }
