"""Prefill/decode disaggregation: a KV connector moves a prompt's KV cache from a prefill instance (the
``kv_producer``) to a decode instance (the ``kv_consumer``), as vLLM's ``--kv-transfer-config`` does.

The call order (``runtime/engine/kv_transfer.py`` makes the calls; docs/kv_transfer.md has the whole story):

producer
  1. A request arrives with ``kv_transfer_params={"do_remote_decode": true}`` and runs its prefill (and its
     one token) as any other.
  2. It finishes; before its blocks can be reused, the workers copy its prompt's KV to the host
     (``Worker.read_kv``), and ``save(request_id, kv)`` keeps it for the consumer and returns the
     ``kv_transfer_params`` its response carries (where to fetch it). A copy nobody fetches expires after
     ``transfer_timeout_s``: the producer's KV blocks are never held for a transfer.
consumer
  3. A request arrives with those params: ``start_load(request_id, params)`` begins fetching; the request
     waits outside the scheduler, holding no blocks.
  4. Every step, ``finished_loads()`` hands over what arrived (or why it did not). KV: blocks are allocated
     for all but the prompt's last token, the workers write it there (``Worker.write_kv``) and the request
     joins the scheduler with those tokens computed (only the last prompt token runs, for its logits).
     A failure: one log line, and the request joins to compute its whole prompt itself.
  5. An aborted request's load is dropped (``cancel_load``).
both
  6. ``close()`` at shutdown.

The KV moves whole per request, between steps, off the captured graphs (a full graph runs every layer at once,
so no per-layer hook can run inside it).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.contracts.kv_transfer import KVTransferConfig

@dataclass
class PromptKV:
    """A prompt's KV on the host: ``num_tokens`` leading tokens, per tensor-parallel rank a dict
    layer name -> [2, num_tokens, kv heads, head dim]."""
    num_tokens: int
    ranks: list[dict[str, torch.Tensor]] = field(default_factory=list)


class KVConnector(abc.ABC):
    def __init__(self, config: KVTransferConfig) -> None:
        self.config = config
        self.sent_tokens = 0  # prompt tokens whose KV went to a consumer
        self.received_tokens = 0  # prompt tokens whose KV came from a producer

    # ---- producer ----------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, request_id: str, kv: PromptKV) -> dict[str, Any]:
        """Keep ``kv`` for a consumer; the ``kv_transfer_params`` that let one fetch it."""

    # ---- consumer ----------------------------------------------------------------------------
    @abc.abstractmethod
    def start_load(self, request_id: str, params: dict[str, Any]) -> None:
        """Begin fetching the KV ``params`` (a producer's response) point at; raises ValueError for bad params."""

    @abc.abstractmethod
    def finished_loads(self) -> list[tuple[str, PromptKV | Exception]]:
        """Loads that ended since the last call: the KV, or the error that ended them."""

    @abc.abstractmethod
    def cancel_load(self, request_id: str) -> None:
        """Forget a load (its request was aborted)."""

    def close(self) -> None:
        """Stop serving and fetching."""
