"""What a worker hands back for a step: the sampled token (and log-probs) of every sampling request."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepResult:
    sampled: dict[str, int]
    # request id -> (sampled token logprob, [(token, logprob), ...] top entries or None)
    logprobs: dict[str, tuple[float, list[tuple[int, float]] | None]]
