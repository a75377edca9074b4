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


def gather_kv(kv_caches: dict[str, torch.Tensor], block_ids: list[int], num_tokens: int) -> dict[str, torch.Tensor]:
    """The first ``num_tokens`` tokens' K and V in ``block_ids`` (a request's blocks, in token order), per layer:
    [2, num_tokens, num_kv_heads, head_dim] on the host (a KV transfer sends them)."""
    index = torch.tensor(block_ids, dtype=torch.long)
    out = {}
    for name, cache in kv_caches.items():
        picked = cache.index_select(1, index.to(cache.device))  # [2, blocks, block_size, heads, dim]
        out[name] = picked.flatten(1, 2)[:, :num_tokens].to("cpu")
    return out


def scatter_kv(kv_caches: dict[str, torch.Tensor], block_ids: list[int], kv: dict[str, torch.Tensor]) -> None:
    """Write ``gather_kv``'s output (any number of leading tokens) into ``block_ids``, in token order."""
    for name, cache in kv_caches.items():
        tokens = kv[name]  # [2, n, heads, dim]
        n, block_size = tokens.shape[1], cache.shape[2]
        if len(block_ids) * block_size < n:
            raise ValueError(f"{len(block_ids)} blocks of {block_size} cannot hold {n} tokens")
        flat = tokens.to(cache.device, cache.dtype)
        for i, block_id in enumerate(block_ids[: -(-n // block_size)]):
            part = flat[:, i * block_size: (i + 1) * block_size]
            cache[:, block_id, : part.shape[1]].copy_(part)
