"""Per-step attention metadata: what the attention op needs to know about the batch.

Tokens of all requests are flattened into one dimension. Request ``i`` owns query rows
``query_start_loc[i]:query_start_loc[i+1]``; its KV history (cached prefix plus the new
tokens) has ``seq_lens[i]`` entries, stored in the blocks listed in ``block_tables[i]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # [num_tokens] int64: flat KV-cache slot (block * block_size + offset) for each new
    # token; -1 for padded rows, which the KV-store skips.
    slot_mapping: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32: physical block ids of each request.
    block_tables: torch.Tensor
    # [num_seqs] int32: total KV length of each request after this step.
    seq_lens: torch.Tensor
    # [num_seqs + 1] int32: cumulative query lengths; query_start_loc[-1] == num_actual_tokens.
    query_start_loc: torch.Tensor
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host copies, so reference code can plan without a device sync.
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        num_padded_tokens: int | None = None,
    ) -> "AttentionMetadata":
        """Build metadata from host lists (tests, and the model runner's slow path)."""
        if len(query_lens) != len(seq_lens) or len(seq_lens) != len(block_tables):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per request")
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
            if q_len > s_len:
                raise ValueError(f"query length {q_len} exceeds sequence length {s_len}")
            for pos in range(s_len - q_len, s_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        num_tokens = len(slots)
        if num_padded_tokens is not None and num_padded_tokens > num_tokens:
            slots.extend([-1] * (num_padded_tokens - num_tokens))
        width = max((len(t) for t in block_tables), default=0) or 1
        tables = [t + [0] * (width - len(t)) for t in block_tables]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device).reshape(len(tables), width),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            num_actual_tokens=num_tokens,
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            block_size=block_size,
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )
