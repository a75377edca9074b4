"""Tensor-parallel building blocks: how each weight is cut across ranks and where ranks talk.

Each layer keeps the parameter names of its unsharded counterpart (``qkv_proj.weight`` ...) and
knows which slice of the checkpoint tensor it holds (``checkpoint_slice``), so the loader cuts
tensors at load time without a second copy of the model. On one rank every layer computes
exactly what ``nn.Linear`` / ``nn.Embedding`` compute, with no collective in the graph.

Shards may be uneven: a dimension of ``n`` over ``w`` ranks gives the first ``n % w`` ranks one
more row. Attention heads are cut at whole KV groups (see :func:`head_shards`), so a model whose
head count the world size does not divide (SmolLM2: 9 query heads, 3 KV heads) still shards
correctly, with the ranks doing unequal work.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.distributed.collectives import gather_last_dim, reduce_across
from runtime.distributed.parallel_state import ParallelContext, current_parallel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, start + count)`` of a dimension of size ``full``."""
    full: int
    start: int
    count: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.count)


def even_shard(full: int, rank: int, world_size: int) -> Shard:
    base, extra = divmod(full, world_size)
    start = rank * base + min(rank, extra)
    return Shard(full, start, base + (1 if rank < extra else 0))


@dataclass(frozen=True)
class HeadShards:
    q: Shard  # query heads
    kv: Shard  # key/value heads


def head_shards(num_heads: int, num_kv_heads: int, parallel: ParallelContext) -> HeadShards:
    """This rank's query and KV heads. KV groups are never split: with at least as many KV heads
    as ranks, each rank takes whole groups; with fewer, each KV head is replicated on
    ``world / num_kv_heads`` ranks, which split its group's query heads."""
    world, rank = parallel.world_size, parallel.rank
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    if num_kv_heads >= world:
        kv = even_shard(num_kv_heads, rank, world)
        return HeadShards(Shard(num_heads, kv.start * group, kv.count * group), kv)
    replicas = world // num_kv_heads
    if world % num_kv_heads or group % replicas:
        raise ValueError(
            f"tensor_parallel_size={world} cannot shard attention with {num_heads} query heads and "
            f"{num_kv_heads} KV heads: with fewer KV heads than ranks, the world size must be a multiple of "
            f"the KV heads and divide each KV group's {group} query heads")
    kv_head, part = divmod(rank, replicas)
    per_rank = group // replicas
    return HeadShards(Shard(num_heads, kv_head * group + part * per_rank, per_rank), Shard(num_kv_heads, kv_head, 1))


class ColumnParallelLinear(nn.Linear):
    """Output features cut across ranks; a fused projection has several ``parts`` (q, k, v or
    gate, up), each cut on its own and stored back to back: ``[q_local | k_local | v_local]``."""

    def __init__(self, in_features: int, parts: list[Shard], bias: bool = False) -> None:
        super().__init__(in_features, sum(p.count for p in parts), bias=bias)
        self.parts = parts

    def part_slices(self, index: int) -> tuple[slice, slice]:
        """(rows of our parameter, rows of the checkpoint's part tensor) for part ``index``."""
        offset = sum(p.count for p in self.parts[:index])
        part = self.parts[index]
        return slice(offset, offset + part.count), part.rows

    def checkpoint_slice(self, leaf: str) -> tuple:
        if len(self.parts) != 1:
            raise ValueError("a fused projection is loaded part by part")
        return (self.parts[0].rows,)


class RowParallelLinear(nn.Linear):
    """Input features cut across ranks; partial outputs summed over the group. The bias is added
    once, after the sum."""

    def __init__(self, shard: Shard, out_features: int, bias: bool = False,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__(shard.count, out_features, bias=bias)
        self.shard = shard
        self.parallel = parallel or current_parallel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.parallel.communicates:
            return super().forward(x)
        y = reduce_across(F.linear(x, self.weight), self.parallel)
        return y if self.bias is None else y + self.bias

    def checkpoint_slice(self, leaf: str) -> tuple:
        return (slice(None), self.shard.rows) if leaf == "weight" else ()


class VocabParallelEmbedding(nn.Embedding):
    """Vocabulary rows cut across ranks; a token's row comes from its owner, zeros elsewhere, and
    the all-reduce assembles it."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext | None = None) -> None:
        parallel = parallel or current_parallel()
        shard = even_shard(vocab_size, parallel.rank, parallel.world_size)
        super().__init__(shard.count, hidden_size)
        self.parallel, self.shard, self.vocab_size = parallel, shard, vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.parallel.is_parallel:
            return super().forward(input_ids)
        local = input_ids - self.shard.start
        mine = (local >= 0) & (local < self.shard.count)
        rows = F.embedding(local.clamp(0, self.shard.count - 1), self.weight)
        return reduce_across(rows * mine.unsqueeze(-1).to(rows.dtype), self.parallel)

    def checkpoint_slice(self, leaf: str) -> tuple:
        return (self.shard.rows,)


class ParallelLMHead(nn.Module):
    """LM head cut by vocabulary rows (the same cut as the embedding, so tied weights stay tied);
    every rank gets the full logits through an all-gather."""

    def __init__(self, hidden_size: int, vocab_size: int, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.parallel = parallel or current_parallel()
        self.shard = even_shard(vocab_size, self.parallel.rank, self.parallel.world_size)
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(self.shard.count, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if not self.parallel.is_parallel:
            return logits
        # Uneven shards: pad to the largest so every rank sends the same shape, then drop the pad.
        width = -(-self.vocab_size // self.parallel.world_size)
        padded = F.pad(logits, (0, width - self.shard.count))
        gathered = gather_last_dim(padded, self.parallel, "logits_all_gather")
        keep = [gathered[..., r * width: r * width + even_shard(self.vocab_size, r, self.parallel.world_size).count]
                for r in range(self.parallel.world_size)]
        return torch.cat(keep, dim=-1)

    def checkpoint_slice(self, leaf: str) -> tuple:
        return (self.shard.rows,)


def check_shardable(config, parallel_config) -> None:
    """Raise a one-line ValueError if ``config`` cannot be cut over the requested ranks."""
    world = parallel_config.tensor_parallel_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for rank in range(world):
        head_shards(heads, kv_heads, ParallelContext(rank, world))
    if kv_heads >= world and kv_heads % world:
        logger.warning("%d KV heads over %d ranks: ranks hold %d or %d KV groups of attention (unequal work)",
                       kv_heads, world, kv_heads // world + 1, kv_heads // world)
    experts = getattr(config, "num_experts", 0) or 0
    if parallel_config.enable_expert_parallel:
        if not experts:
            raise ValueError("enable_expert_parallel needs a mixture-of-experts model; this one has no experts")
        if experts < world:
            raise ValueError(f"expert parallelism over {world} ranks needs at least {world} experts, "
                             f"the model has {experts}")
