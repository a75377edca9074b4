"""What the scheduler hands the worker each step: which tokens of which requests to compute."""
from __future__ import annotations

from dataclasses import dataclass, field

from runtime.contracts.request import Request


@dataclass
class ScheduledRequest:
    """Computes tokens ``[start_pos, start_pos + num_new_tokens)`` of the request this step."""

    request: Request
    num_new_tokens: int
    # Snapshots taken at schedule time, before the scheduler moves the request on: the
    # answers must not change under the runner's or the updater's feet.
    start_pos: int = field(init=False)
    _samples: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.start_pos = self.request.num_computed_tokens
        self._samples = self.start_pos + self.num_new_tokens >= self.request.num_scheduled_tokens

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last token, so a token is sampled."""
        return self._samples


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
