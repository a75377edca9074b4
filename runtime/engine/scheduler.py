"""Continuous-batching scheduler: decides which tokens of which requests run each step.

One token budget covers prefills and decodes alike (vLLM v1 style). Running requests
are served first, in arrival order, so decodes are never starved by new prompts; what
is left of the budget admits waiting requests in FIFO order, chunking long prompts
across steps. When the KV cache runs out, the newest running request is preempted: its
blocks are freed and it is recomputed from scratch later (its full blocks usually
survive in the prefix cache, so the recompute is mostly cache hits).
"""
from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable

from runtime.engine.kv_cache import KVCacheManager
from runtime.contracts.request import Request, RequestStatus
from runtime.contracts.scheduler_output import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # Cap on one request's prefill chunk per step, so one long prompt can't take the
    # whole budget from other prefills; 0 = off. Applies only with chunked prefill.
    long_prefill_token_threshold: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self._requests: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        # Kept sorted by arrival time, so the last entry is always the newest request:
        # the preemption victim, and the one whose lost work is cheapest to redo.
        self._running: list[Request] = []
        # Running requests whose last token is in flight (async scheduling): nothing left to schedule, so
        # their KV blocks went back at once; they finish when that token arrives.
        self._ending: set[str] = set()
        self._finished_ids: list[str] = []
        # Told of every request finishing, before its blocks are freed (runtime/engine/kv_transfer.py).
        self.finish_listener: Callable[[Request], None] | None = None
        # Prompt tokens scheduled to run through the model (not served from the prefix cache or a producer's KV).
        self.num_prompt_tokens_computed = 0

    # ----------------------------------------------------------------- requests

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.status is not RequestStatus.WAITING:
            raise ValueError(f"request {request.request_id!r} added with status {request.status.name}")
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> bool:
        """Finish a waiting or running request now and free its blocks.

        Returns False if the id is unknown or already finished.
        """
        if not status.is_finished:
            raise ValueError(f"finish_request needs a finished status, got {status.name}")
        request = self._requests.get(request_id)
        if request is None:
            return False
        if request.request_id in self._ending:
            self._ending.discard(request.request_id)
        elif request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self._finish(request, status)
        return True

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running or self._ending)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ----------------------------------------------------------------- scheduling

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        budget = self._schedule_running(budget, scheduled, preempted)
        # After a preemption the cache is known to be short; admitting new work now
        # would only get it preempted next step.
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        for item in scheduled:
            # Moved on now, not when the results are back: with async scheduling the next step is
            # scheduled while this one runs, and must neither repeat its tokens nor wait for them.
            item.request.num_computed_tokens += item.num_new_tokens
            item.request.num_pending_outputs += item.samples
        finished_ids, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            scheduled=scheduled,
            preempted_ids=[r.request_id for r in preempted],
            finished_ids=finished_ids,
        )

    def _remaining_of_running(self) -> list[tuple[int, int]]:
        """(tokens each running request has once its in-flight samples are back, tokens left to compute).

        A request whose in-flight token is its last (max_tokens or max_model_len reached) has nothing
        left: its blocks go back now, before anything is allocated (the step writing their KV runs before
        any step that could reuse them, and the step after it would have freed them in synchronous
        scheduling too), and it finishes when the token arrives. One pass, inlined: this runs for every
        running request every step.
        """
        max_len = self.config.max_model_len
        counts: list[tuple[int, int]] = []
        ending: list[Request] = []
        for request in self._running:
            pending, num_outputs = request.num_pending_outputs, len(request.output_token_ids)
            total = len(request.prompt_token_ids) + num_outputs + pending
            if pending and (num_outputs + pending >= request.sampling_params.max_tokens or total >= max_len):
                ending.append(request)
            else:
                counts.append((total, total - request.num_computed_tokens))
        for request in ending:
            self._running.remove(request)
            self.kv_cache.free(request)
            self._ending.add(request.request_id)
        return counts

    def _schedule_running(self, budget: int, scheduled: list[ScheduledRequest], preempted: list[Request]) -> int:
        # With chunked prefill off a request is only admitted with its whole prompt, so a
        # running request never has a prefill left that could need to wait here.
        # A prefill chunk leaves budget for the decodes behind it, so an older request's long
        # (re)prefill never starves the running decodes.
        counts = self._remaining_of_running()
        decodes_after = _decodes_after([left for _, left in counts])
        capacity = self.kv_cache.block_size
        i = 0
        while i < len(self._running) and budget > 0:
            request, (total, remaining) = self._running[i], counts[i]
            reserve = decodes_after[i] if remaining > 1 else 0
            i += 1
            num_new = 1 if remaining == 1 else self._chunk(remaining, budget - reserve)  # a decode, or a prefill
            if num_new <= 0:
                continue  # nothing to compute until its sampled token arrives
            start = request.num_computed_tokens
            if (start + num_new > len(request.block_ids) * capacity  # its last block is full (the rare case)
                    and not self._allocate_or_preempt(request, num_new, preempted)):
                break  # it preempted itself, and it was the last one
            if start < len(request.prompt_token_ids):  # a prefill chunk (or a preempted request's recompute)
                self.num_prompt_tokens_computed += min(num_new, len(request.prompt_token_ids) - start)
            scheduled.append(ScheduledRequest(request, num_new, start, start + num_new >= total))
            budget -= num_new
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        """Allocate for a running request, preempting newest-first until it fits.

        Victims come from the tail of the running list, which this step has not
        scheduled yet, so nothing already in the output is ever taken back.
        """
        while not self.kv_cache.allocate(request, num_new):
            victim = self._running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        # Front of the queue: it was admitted before anything still waiting.
        self._waiting.appendleft(request)
        logger.debug(
            "preempted request %s (preemption #%d, cache usage %.0f%%)",
            request.request_id,
            request.num_preemptions,
            100 * self.kv_cache.usage,
        )

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> None:
        while self._waiting and budget > 0 and len(self._running) < self.config.max_num_seqs:
            request = self._waiting[0]
            if request.num_pending_outputs:
                return  # preempted with a token in flight: its prompt for the recompute is not complete yet
            reason = self._rejection_reason(request)
            if reason is not None:
                self._waiting.popleft()
                request.finish_reason_detail = reason
                logger.warning("aborting request %s: %s", request.request_id, reason)
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                continue
            if request.block_ids:  # its prompt's KV came from a prefill instance (a KV connector) into these blocks
                computed_blocks, num_cached = None, request.num_computed_tokens
            else:
                computed_blocks, num_cached = self.kv_cache.get_computed_blocks(request)
            remaining = request.num_tokens - num_cached
            num_new = self._chunk(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                return  # FIFO: nothing behind it may overtake
            request.num_computed_tokens = num_cached
            if not self.kv_cache.allocate(request, num_new, computed_blocks):
                request.num_computed_tokens = num_cached if computed_blocks is None else 0
                return
            self._waiting.popleft()
            self._admit(request, num_cached)
            self.num_prompt_tokens_computed += max(0, min(num_new, len(request.prompt_token_ids) - num_cached))
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def _admit(self, request: Request, num_cached: int) -> None:
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_cached
        request.status = RequestStatus.RUNNING
        bisect.insort(self._running, request, key=lambda r: r.arrival_time)

    def _chunk(self, remaining: int, budget: int) -> int:
        num_new = remaining if remaining < budget else budget
        if num_new > 1 and self.config.enable_chunked_prefill and self.config.long_prefill_token_threshold > 0:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _rejection_reason(self, request: Request) -> str | None:
        """Why the request can never be scheduled, or None if it can."""
        if request.num_prompt_tokens > self.config.max_model_len:
            return (
                f"prompt has {request.num_prompt_tokens} tokens, "
                f"more than max_model_len={self.config.max_model_len}"
            )
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and request.num_tokens > budget:
            return (
                f"needs {request.num_tokens} tokens in one step with chunked prefill off, "
                f"more than max_num_batched_tokens={budget}"
            )
        # Counts output tokens too: a preempted request must recompute all of them.
        needed = self.kv_cache.num_blocks_needed(request.num_tokens)
        if needed > self.kv_cache.num_blocks:
            return (
                f"needs {needed} KV blocks for {request.num_tokens} tokens, "
                f"but the cache has only {self.kv_cache.num_blocks}"
            )
        return None

    # ----------------------------------------------------------------- results

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Take in a step's sampled tokens (its KV was counted at schedule time); returns the requests
        finished by them."""
        finished: list[Request] = []
        running, waiting, ending = RequestStatus.RUNNING, RequestStatus.WAITING, self._ending
        max_len = self.config.max_model_len
        for item in output.scheduled:
            request = item.request
            if request.status is not running and request.status is not waiting:
                continue  # aborted or stopped after it was scheduled: what the step computed is dropped
            token = None
            if item.samples:
                request.num_pending_outputs -= 1
                token = sampled.get(request.request_id)
                if token is None:
                    logger.warning("request %s was due a sampled token but got none", request.request_id)
                else:
                    # Appended also when the request was preempted after this step was scheduled: the
                    # token was sampled from its complete KV, and the recompute starts from it.
                    request.output_token_ids.append(token)
            if request.status is running and request.request_id not in ending:
                self.kv_cache.cache_full_blocks(request)
            if token is None:
                continue
            num_outputs = len(request.output_token_ids)  # the checks of _stop_status, inlined for the common "no"
            if (token not in request.stop_token_set and num_outputs < request.sampling_params.max_tokens
                    and len(request.prompt_token_ids) + num_outputs < max_len):
                continue
            status = self._stop_status(request, token)
            if status is not None:
                self.finish_request(request.request_id, status)
                finished.append(request)
        return finished

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params, num_outputs = request.sampling_params, len(request.output_token_ids)
        if token in request.stop_token_set and num_outputs >= params.min_tokens:
            return RequestStatus.FINISHED_STOPPED
        if num_outputs >= params.max_tokens or len(request.prompt_token_ids) + num_outputs >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Free a request already taken out of the waiting/running queues."""
        if self.finish_listener is not None:
            self.finish_listener(request)  # a KV connector copies the prompt's KV out before the blocks go
        self.kv_cache.free(request)
        request.status = status
        del self._requests[request.request_id]
        self._finished_ids.append(request.request_id)


def _decodes_after(remaining: list[int]) -> list[int]:
    """For each running request, how many requests after it decode this step (one token left):
    the budget its prefill chunk must leave them. One pass from the back (this runs every step)."""
    after = [0] * len(remaining)
    count = 0
    for i in range(len(remaining) - 1, -1, -1):
        after[i] = count
        count += remaining[i] == 1
    return after
