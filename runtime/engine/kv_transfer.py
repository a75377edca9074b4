"""``KVTransfer``: where the engine meets its KV connector (runtime/engine/kv_connector.py has the call order).

Producer: the scheduler reports each finishing request before freeing its blocks; those asked for by a
decode instance (``do_remote_decode``) have their prompt's KV copied to the host by the workers right after
the step (nothing else can have reused the blocks yet), saved with the connector, and the request's output
carries the ``kv_transfer_params`` to fetch it. Consumer: a request with a producer's params waits here,
holding no blocks, until its KV arrives; then it joins the scheduler with all but its last prompt token
computed. A failed transfer leaves the request to compute its prompt itself.
"""
from __future__ import annotations

import logging
from typing import Any

from runtime.contracts.request import Request
from runtime.engine.executor import Executor
from runtime.engine.kv_cache import KVCacheManager
from runtime.contracts.kv_transfer import KVTransferConfig
from runtime.engine.kv_connector import KVConnector, PromptKV
from runtime.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


def make_connector(config: KVTransferConfig) -> KVConnector:
    if config.kv_connector == "zmq":
        from runtime.engine.zmq_kv_connector import ZmqKVConnector  # pyzmq: only where KV moves
        return ZmqKVConnector(config)
    raise ValueError(f"unknown kv_connector {config.kv_connector!r}")


class KVTransfer:
    def __init__(self, connector: KVConnector, executor: Executor, kv_cache: KVCacheManager,
                 scheduler: Scheduler, world_size: int) -> None:
        self.connector, self.world_size = connector, world_size
        self.executor, self.kv_cache, self.scheduler = executor, kv_cache, scheduler
        self._to_save: set[str] = set()  # producer: requests a decode instance will fetch
        self._finished: list[tuple[str, list[int], int]] = []  # (request id, its blocks, prompt tokens computed)
        self._waiting: dict[str, Request] = {}  # consumer: requests whose KV is on its way
        if connector.config.is_producer:
            scheduler.finish_listener = self._on_finish

    # ---- requests in -------------------------------------------------------------------------
    def add(self, request: Request, params: dict[str, Any] | None) -> bool:
        """Take ``request`` in; False when it goes straight to the scheduler instead."""
        if not params:
            return False
        if params.get("do_remote_decode"):
            if not self.connector.config.is_producer:
                raise ValueError("kv_transfer_params asks this instance to prefill for a decode instance, but its "
                                 f"kv_role is {self.connector.config.kv_role}")
            self._to_save.add(request.request_id)
            return False
        if not self.connector.config.is_consumer:
            raise ValueError(f"kv_transfer_params points at a producer's KV, but this instance's kv_role is "
                             f"{self.connector.config.kv_role}")
        self.connector.start_load(request.request_id, params)
        self._waiting[request.request_id] = request
        return True

    def abort(self, request_id: str) -> bool:
        self._to_save.discard(request_id)
        if self._waiting.pop(request_id, None) is None:
            return False
        self.connector.cancel_load(request_id)
        return True

    @property
    def has_waiting(self) -> bool:
        return bool(self._waiting)

    # ---- consumer: loads in --------------------------------------------------------------------
    def admit_loaded(self) -> None:
        """Requests whose KV arrived (or failed to) join the scheduler."""
        for request_id, result in self.connector.finished_loads():
            request = self._waiting.pop(request_id, None)
            if request is None:
                continue  # aborted meanwhile
            if isinstance(result, Exception):
                logger.warning("KV transfer for request %s failed (%s): computing its prompt here", request_id, result)
            else:
                self._place(request, result)
            self.scheduler.add_request(request)

    def _place(self, request: Request, kv: PromptKV) -> None:
        # The last prompt token runs through the model here: its logits give the first token.
        tokens = min(kv.num_tokens, request.num_prompt_tokens - 1)
        if tokens <= 0:
            return
        if len(kv.ranks) != self.world_size:
            logger.warning("KV transfer for request %s: the producer has %d tensor-parallel ranks, this instance %d; "
                           "computing its prompt here", request.request_id, len(kv.ranks), self.world_size)
            return
        if not self.kv_cache.allocate(request, tokens):
            logger.warning("KV transfer for request %s: no free KV blocks for its %d tokens now; computing its "
                           "prompt here", request.request_id, tokens)
            return
        self.executor.call_workers("write_kv", request.block_ids, [{n: t[:, :tokens] for n, t in rank.items()}
                                                                   for rank in kv.ranks])
        request.num_computed_tokens = request.num_cached_tokens = tokens

    # ---- producer: saves out -------------------------------------------------------------------
    def _on_finish(self, request: Request) -> None:
        """The scheduler's word, before it frees the blocks."""
        if request.request_id in self._to_save:
            self._to_save.discard(request.request_id)
            computed = min(request.num_computed_tokens, request.num_prompt_tokens)
            if computed == request.num_prompt_tokens:  # an abort mid-prefill leaves nothing to send
                self._finished.append((request.request_id, list(request.block_ids), computed))

    def save_finished(self) -> dict[str, dict[str, Any]]:
        """The KV of requests finished this step, copied out and saved: request id -> its kv_transfer_params."""
        params = {}
        for request_id, block_ids, tokens in self._finished:
            ranks = self.executor.call_workers("read_kv", block_ids, tokens)
            params[request_id] = self.connector.save(request_id, PromptKV(tokens, ranks))
        self._finished = []
        return params

    def close(self) -> None:
        self.connector.close()
