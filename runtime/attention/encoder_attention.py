"""Bidirectional attention over packed variable-length sequences (vision encoders), as a custom op.

Images are packed along one token dimension; ``cu_seqlens`` holds each image's (each frame's)
boundaries. A token attends to every token of its own segment and to nothing else. Trailing
entries of ``cu_seqlens`` may repeat (empty segments), which lets the encoder's static graphs keep
``cu_seqlens`` in a fixed-size persistent buffer. Padding rows get a segment of their own (the
caller ends ``cu_seqlens`` at the padded size), so they never mix with an image.

The op is ``graphmode::encoder_attention``; its ``backend`` argument picks the kernel:
- ``sdpa``: torch's scaled_dot_product_attention over the whole packed batch with a
  block-diagonal boolean mask (one call, no host sync, capturable in a static graph);
- ``naive``: matmul + masked softmax in fp32, the reference the others are tested against.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from runtime.ops.library import graph_op

ENCODER_ATTENTION_OP = "graphmode::encoder_attention"


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens] segment index of each packed row (rows of one image share an index)."""
    rows = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, rows, right=True)


def block_diagonal_mask(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens, num_tokens] bool, True where query and key rows belong to the same segment."""
    seg = segment_ids(cu_seqlens, num_tokens)
    return seg[:, None] == seg[None, :]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    n = q.shape[0]
    mask = block_diagonal_mask(cu_seqlens, n)
    # [T, H, D] -> [1, H, T, D]: one packed "batch" whose mask keeps images apart.
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
           scale: float) -> torch.Tensor:
    n = q.shape[0]
    mask = block_diagonal_mask(cu_seqlens, n)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    scores = scores.masked_fill(~mask[None], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


ENCODER_ATTENTION_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"sdpa": _sdpa, "naive": _naive}


def check_backend(name: str) -> str:
    if name not in ENCODER_ATTENTION_BACKENDS:
        raise ValueError(f"unknown encoder attention backend {name!r}; known: {sorted(ENCODER_ATTENTION_BACKENDS)}")
    return name


@graph_op(ENCODER_ATTENTION_OP, mutates_args=("out",))
def encoder_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                      out: torch.Tensor, scale: float, backend: str) -> None:
    """query/key/value/out [T, H, D]; cu_seqlens [S + 1] int32, non-decreasing, last >= T."""
    out.copy_(ENCODER_ATTENTION_BACKENDS[backend](query, key, value, cu_seqlens, scale))


@encoder_attention.register_fake
def _encoder_attention_fake(query, key, value, cu_seqlens, out, scale, backend) -> None:
    return None


def reference_packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                               scale: float) -> torch.Tensor:
    """fp32 attention computed image by image (no mask, no packing): what every backend must equal."""
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].float().transpose(0, 1) for t in (q, k, v))
        probs = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        outs.append((probs @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)
