"""A step's sampled tokens on their way to the host, without stopping the device.

The sampler leaves its results on the device. ``PendingStep.start`` queues their copies into host
memory (pinned where the platform has it, so the copy is asynchronous) and records an event behind
them; the launching thread moves on at once, and only ``result()`` waits, for that event alone. With
async scheduling the engine calls ``result()`` after it has launched the next step, so the wait
overlaps the device's work instead of idling it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from runtime.contracts.request import Request
from runtime.contracts.runner_output import StepResult
from runtime.platforms import current_platform
from runtime.worker.sampler import SamplerOutput


def _to_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    host = current_platform.host_buffer(tensor.shape, tensor.dtype)
    host.copy_(tensor, non_blocking=True)
    return host


@dataclass
class PendingStep:
    """One step's results, still being copied to the host."""
    request_ids: list[str]
    logprobs_wanted: list[tuple[int, str, int]]  # (row, request id, top-k asked) of requests that want log-probs
    tokens: torch.Tensor | None  # host copies, complete once ``ready`` has passed
    logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    ready: Any  # a platform event recorded after the copies; None where copies are synchronous
    graph_replays: int = 0
    eager_steps: int = 0

    @classmethod
    def start(cls, requests: list[Request], output: SamplerOutput) -> PendingStep:
        wanted = [(i, r.request_id, r.sampling_params.logprobs) for i, r in enumerate(requests)
                  if r.sampling_params.logprobs is not None]
        logprobs, top_ids, top_lps = ((output.logprobs, output.top_token_ids, output.top_logprobs) if wanted
                                      else (None, None, None))
        pending = cls([r.request_id for r in requests], wanted, _to_host(output.sampled_token_ids),
                      _to_host(logprobs), _to_host(top_ids), _to_host(top_lps), current_platform.new_event())
        if pending.ready is not None:
            pending.ready.record()
        return pending

    @classmethod
    def empty(cls) -> PendingStep:
        """A step that sampled nothing (prefill chunks only)."""
        return cls([], [], None, None, None, None, None)

    def result(self) -> StepResult:
        if self.ready is not None:
            self.ready.synchronize()
        tokens = self.tokens.tolist() if self.tokens is not None else []
        return StepResult(dict(zip(self.request_ids, tokens)), self._logprobs_by_request(),
                          self.graph_replays, self.eager_steps)

    def _logprobs_by_request(self) -> dict[str, tuple[float, list[tuple[int, float]] | None]]:
        if not self.logprobs_wanted:
            return {}
        sampled = self.logprobs.tolist()
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        top_lps = self.top_logprobs.tolist() if self.top_logprobs is not None else None
        out = {}
        for row, request_id, k in self.logprobs_wanted:
            top = list(zip(top_ids[row][:k], top_lps[row][:k])) if (k and top_ids is not None) else None
            out[request_id] = (sampled[row], top)
        return out
