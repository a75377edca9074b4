"""What the scheduler hands the worker each step: which tokens of which requests to compute."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.contracts.request import Request


class ScheduledRequest:
    """Computes tokens ``[start_pos, start_pos + num_new_tokens)`` of the request this step.

    ``start_pos`` and ``samples`` (True when this step computes the request's last token, so a token is
    sampled) are snapshots taken at schedule time, before the scheduler moves the request on: the answers
    must not change under the runner's or the updater's feet. Given explicitly where the caller knows
    them (the scheduler's hot loop, a worker's mirror); read from the request otherwise. A slotted class:
    the scheduler makes one per running request per step.
    """
    __slots__ = ("request", "num_new_tokens", "start_pos", "samples")

    def __init__(self, request: Request, num_new_tokens: int, start_pos: int | None = None,
                 samples: bool | None = None) -> None:
        self.request, self.num_new_tokens = request, num_new_tokens
        self.start_pos = request.num_computed_tokens if start_pos is None else start_pos
        self.samples = (self.start_pos + num_new_tokens >= request.num_scheduled_tokens
                        if samples is None else samples)

    def __repr__(self) -> str:
        return (f"ScheduledRequest({self.request.request_id!r}, num_new_tokens={self.num_new_tokens}, "
                f"start_pos={self.start_pos}, samples={self.samples})")


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted_ids: list[str]
    # Requests freed since the previous schedule(); the runner drops their state.
    finished_ids: list[str]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
