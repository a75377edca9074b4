"""Paged attention on Ascend through torch_npu (same API as runtime/attention/torch_backend.py).

Eager steps (and piecewise graphs, where attention runs between the captured pieces) call
``npu_fused_infer_attention_score`` on the paged KV cache with this step's host-side lengths.

Full-graph decode: the fused-infer-attention op takes its sequence lengths as host integers, so a
captured graph would replay the capture step's lengths. While a full graph is captured the op is
issued inside a graph task group (torch.npu.graph_task_group_begin/end) behind an ExternalEvent,
and the graph's updater re-issues it before every replay with this step's lengths on a side
stream (graph_task_update_begin/end), then records the event the captured task waits on.

Written against torch_npu 2.11 .. 2.14 (graph task group/update APIs: torch_npu 2.11, documented
since Ascend Extension for PyTorch 7.1.0). NOT executed on Ascend hardware by this project's CI.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch
import torch_npu

from runtime.platforms import current_platform  # the NpuPlatform: this backend is only selected there

__all__ = ["store_kv", "paged_attention"]

# sparse_mode 3 (causal, aligned to the bottom-right) takes this compressed mask (torch_npu docs).
_CAUSAL_MASK_SIZE = 2048


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write keys/values [T, KVH, D] into their slots; rows with slot -1 are skipped by the kernel."""
    num_tokens = min(key.shape[0], slot_mapping.shape[0])
    if num_tokens == 0:
        return
    # torch_npu._npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices): caches
    # [num_blocks, block_size, KVH, D], int32 slots, negative slots skipped (torch_npu 2.11, ATB op).
    torch_npu._npu_reshape_and_cache(key[:num_tokens].to(kv_cache.dtype), value[:num_tokens].to(kv_cache.dtype),
                                     kv_cache[0], kv_cache[1], slot_mapping[:num_tokens].to(torch.int32))


@functools.cache
def _causal_mask(device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(_CAUSAL_MASK_SIZE, _CAUSAL_MASK_SIZE, dtype=torch.bool, device=device), 1)


def _paged_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches as [num_blocks, block_size, KVH * D], the op's paged (BnBsH) layout."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    return (kv_cache[0].view(num_blocks, block_size, kv_heads * head_dim),
            kv_cache[1].view(num_blocks, block_size, kv_heads * head_dim))


def _fia_kwargs(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, scale: float,
                query_ends: list[int], kv_lens: list[int], causal: bool) -> dict[str, Any]:
    key, value = _paged_kv(kv_cache)
    # torch_npu.npu_fused_infer_attention_score(query, key, value, *, atten_mask, actual_seq_lengths,
    # actual_seq_lengths_kv, block_table, num_heads, scale, input_layout, num_key_value_heads,
    # sparse_mode, block_size, ...) -> (attention_out, softmax_lse): torch_npu 2.11. TND layout:
    # actual_seq_lengths are cumulative query ends, actual_seq_lengths_kv per-request KV lengths.
    return dict(query=query, key=key, value=value, block_table=block_tables, input_layout="TND",
                block_size=kv_cache.shape[2], actual_seq_lengths=query_ends, actual_seq_lengths_kv=kv_lens,
                num_heads=query.shape[1], num_key_value_heads=kv_cache.shape[3], scale=scale,
                atten_mask=_causal_mask(query.device) if causal else None, sparse_mode=3 if causal else 0)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float,
                    sliding_window: int | None, out: torch.Tensor) -> None:
    """Causal attention of each request's new queries [T, H, D] over its paged KV history, into ``out``."""
    if sliding_window is not None and sliding_window > 0:
        raise ValueError("the NPU attention backend has no sliding-window path yet; "
                         "set GRAPHMODE_ATTENTION_BACKEND=torch for this model")
    graph = current_platform.capturing_graph()
    if graph is not None:
        _capture_decode(graph, current_platform.graph_update_stream(), query, kv_cache, metadata, scale, out)
        return
    query_lens = metadata.query_lens_cpu
    kv_lens = metadata.seq_lens_cpu
    if query_lens is None or kv_lens is None:
        starts = metadata.query_start_loc.tolist()
        query_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
        kv_lens = metadata.seq_lens.tolist()
    num_tokens = sum(query_lens)
    fia = _fia_kwargs(query[:num_tokens], kv_cache, metadata.block_tables[: len(query_lens)], scale,
                      list(accumulate(query_lens)), list(kv_lens), causal=max(query_lens, default=0) > 1)
    attn_out, _ = torch_npu.npu_fused_infer_attention_score(**fia)
    out[:num_tokens].copy_(attn_out.view(num_tokens, *out.shape[1:]))
    if out.shape[0] > num_tokens:
        out[num_tokens:].zero_()


# ---- full-graph decode: captured task group, updated before every replay ------------------
@dataclass
class _CapturedTask:
    fia: dict[str, Any]
    workspace: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    handle: Any
    event: Any
    seq_lens: torch.Tensor  # the persistent device buffer the runner refills before each replay


@dataclass
class FusedAttentionUpdater:
    """Re-issues every captured attention task of one graph with this step's KV lengths."""
    stream: Any
    tasks: list[_CapturedTask] = field(default_factory=list)

    def __call__(self) -> None:
        # Read on the current stream, before switching: the blocking copy waits for the runner's
        # writes of this step's lengths and for the previous replay, so updates never overtake it.
        lengths = {id(t.seq_lens): _kv_lengths(t.seq_lens.tolist()) for t in self.tasks}
        with torch.npu.stream(self.stream):  # torch.npu.stream(stream): torch_npu 2.11
            for task in self.tasks:
                fia = {**task.fia, "actual_seq_lengths_kv": lengths[id(task.seq_lens)]}
                # torch.npu.graph_task_update_begin(stream, handle) / graph_task_update_end(stream),
                # and npu_fused_infer_attention_score.out(..., workspace=, out=[out, lse]): torch_npu 2.11.
                torch.npu.graph_task_update_begin(self.stream, task.handle)
                torch_npu.npu_fused_infer_attention_score.out(**fia, workspace=task.workspace,
                                                              out=[task.out, task.lse])
                torch.npu.graph_task_update_end(self.stream)
                task.event.record(self.stream)


def _kv_lengths(seq_lens: list[int]) -> list[int]:
    # Padded rows of a full graph have length 0; they read one slot of block 0 instead (their
    # outputs are discarded), so the op never sees an empty sequence.
    return [max(1, n) for n in seq_lens]


def _capture_decode(graph: Any, update_stream: Any, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any,
                    scale: float, out: torch.Tensor) -> None:
    if metadata.max_query_len > 1:
        raise RuntimeError("full NPU graphs capture uniform decode batches only (one query token per sequence)")
    rows = query.shape[0]
    seq_lens = metadata.seq_lens[:rows]
    capture_lens = _kv_lengths(list(metadata.seq_lens_cpu or []) + [0] * (rows - len(metadata.seq_lens_cpu or [])))
    fia = _fia_kwargs(query, kv_cache, metadata.block_tables[:rows], scale, list(range(1, rows + 1)),
                      capture_lens[:rows], causal=False)
    # torch_npu._npu_fused_infer_attention_score_get_max_workspace(**same kwargs) -> workspace tensor
    # sized for any lengths, allocated inside the capture (graph pool): torch_npu 2.11.
    workspace = torch_npu._npu_fused_infer_attention_score_get_max_workspace(**fia)
    lse = torch.empty(1, dtype=query.dtype, device=query.device)
    stream = torch.npu.current_stream()  # the capture stream (torch_npu 2.11)
    # torch.npu.ExternalEvent(): wait(stream) / reset(stream) / record(stream): torch_npu 2.11.
    event = torch.npu.ExternalEvent()
    event.wait(stream)
    event.reset(stream)
    torch.npu.graph_task_group_begin(stream)
    torch_npu.npu_fused_infer_attention_score.out(**fia, workspace=workspace, out=[out, lse])
    handle = torch.npu.graph_task_group_end(stream)
    updater = graph.task_updaters.setdefault("fused_infer_attention", FusedAttentionUpdater(update_stream))
    updater.tasks.append(_CapturedTask(fia, workspace, out, lse, handle, event, seq_lens))
