"""One generation request as the scheduler and KV-cache manager see it.

A request's tokens are ``prompt_token_ids + output_token_ids``, then ``num_pending_outputs``
tokens sampled by steps whose results are not back on the host yet (async scheduling keeps one
step in flight; its token feeds the next step's input on the device). ``num_computed_tokens``
counts the leading tokens whose KV is in the cache or being written by a step already scheduled,
so the tokens still to run through the model are the rest of the prompt during prefill, or the
one token sampled last step during decode.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.contracts.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in FINISHED_STATUSES


FINISHED_STATUSES = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache or scheduled to be; reset to 0 on preemption (the KV is dropped).
    num_computed_tokens: int = 0
    # Tokens sampled by scheduled steps whose results have not reached ``output_token_ids`` yet.
    num_pending_outputs: int = 0
    # Physical KV blocks, in token order; owned by the KVCacheManager.
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Prompt tokens served from the prefix cache at first schedule (stats only).
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # Why the scheduler finished the request on its own (e.g. prompt too long), for the user.
    finish_reason_detail: str | None = None
    # Images of a multimodal prompt (models.qwen2_vl_processing.MultimodalPrompt), else None.
    multimodal: object | None = None
    # Seed of this sequence's own sampling generator (the sampling worker keeps the generator); None
    # samples from the worker's shared one.
    seed: int | None = None
    _stop_token_set: frozenset[int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def stop_token_set(self) -> frozenset[int]:
        """Token ids that stop it once min_tokens are out: its stop_token_ids, and EOS unless ignored."""
        stop = self._stop_token_set
        if stop is None:
            params = self.sampling_params
            ids = set(params.stop_token_ids or ())
            if self.eos_token_id is not None and not params.ignore_eos:
                ids.add(self.eos_token_id)
            stop = self._stop_token_set = frozenset(ids)
        return stop

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the request will have once every scheduled step's sample is back."""
        return self.num_tokens + self.num_pending_outputs

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
