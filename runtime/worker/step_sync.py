"""Shipping each step's scheduler output from the engine to the worker processes, as a delta.

Workers keep a mirror of every running request; per step the engine sends, for each scheduled
request, only what changed since it last sent it (output tokens appended, the block table when
it changed), and the whole request the first time. A step's message so stays small however long
the sequences grow.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from runtime.contracts.request import Request
from runtime.contracts.scheduler_output import ScheduledRequest, SchedulerOutput


@dataclass
class ScheduledDelta:
    request_id: str
    num_new_tokens: int
    start_pos: int
    samples: bool
    num_outputs: int  # output tokens the request has after applying ``new_outputs``
    new_outputs: list[int]
    block_ids: list[int] | None  # None: unchanged since last sent
    request: Request | None = None  # set the first time the workers see the request


@dataclass
class StepMessage:
    scheduled: list[ScheduledDelta]
    preempted_ids: list[str]
    finished_ids: list[str]


@dataclass
class _Sent:
    num_outputs: int
    block_ids: list[int]


@dataclass
class StepEncoder:
    """Engine side: remembers what the workers know about each request."""
    _sent: dict[str, _Sent] = field(default_factory=dict)

    def encode(self, output: SchedulerOutput) -> StepMessage:
        for rid in output.finished_ids:
            self._sent.pop(rid, None)
        deltas = []
        for item in output.scheduled:
            req = item.request
            known = self._sent.get(req.request_id)
            outputs = req.output_token_ids
            if known is None:
                snapshot = copy.copy(req)
                snapshot.prompt_token_ids, snapshot.output_token_ids = list(req.prompt_token_ids), list(outputs)
                snapshot.block_ids = list(req.block_ids)
                deltas.append(ScheduledDelta(req.request_id, item.num_new_tokens, item.start_pos, item.samples,
                                             len(outputs), [], None, snapshot))
            else:
                blocks = None if known.block_ids == req.block_ids else list(req.block_ids)
                deltas.append(ScheduledDelta(req.request_id, item.num_new_tokens, item.start_pos, item.samples,
                                             len(outputs), outputs[known.num_outputs:], blocks))
            self._sent[req.request_id] = _Sent(len(outputs), list(req.block_ids))
        return StepMessage(deltas, list(output.preempted_ids), list(output.finished_ids))


@dataclass
class StepDecoder:
    """Worker side: the mirror of the engine's requests, rebuilt into a ``SchedulerOutput``."""
    requests: dict[str, Request] = field(default_factory=dict)

    def decode(self, message: StepMessage) -> SchedulerOutput:
        for rid in message.finished_ids:
            self.requests.pop(rid, None)
        scheduled = []
        for delta in message.scheduled:
            if delta.request is not None:
                req = self.requests[delta.request_id] = delta.request
            else:
                req = self.requests[delta.request_id]
                del req.output_token_ids[delta.num_outputs - len(delta.new_outputs):]
                req.output_token_ids.extend(delta.new_outputs)
                if delta.block_ids is not None:
                    req.block_ids = delta.block_ids
            if len(req.output_token_ids) != delta.num_outputs:
                raise RuntimeError(f"worker mirror of request {delta.request_id!r} is out of sync")
            req.num_computed_tokens = delta.start_pos
            scheduled.append(ScheduledRequest(req, delta.num_new_tokens, delta.start_pos, delta.samples))
        return SchedulerOutput(scheduled, message.preempted_ids, message.finished_ids)
