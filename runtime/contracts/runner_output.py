"""What a worker hands back for a step: the sampled token (and log-probs) of every sampling request,
and how the step ran (the counters live in the worker's process, which under tensor parallelism is
not the engine's)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class StepResult:
    sampled: dict[str, int]
    # request id -> (sampled token logprob, [(token, logprob), ...] top entries or None)
    logprobs: dict[str, tuple[float, list[tuple[int, float]] | None]]
    graph_replays: int = 0  # static device graphs this step replayed on the rank
    eager_steps: int = 0  # forwards this step ran without a graph although graphs were enabled


class StepHandle(Protocol):
    """A launched step: ``result()`` waits for its results on the host (at once, for a step run synchronously)."""

    def result(self) -> StepResult: ...


@dataclass
class FinishedStep:
    """The handle of a step that was waited for already (executors without overlap)."""
    value: StepResult

    def result(self) -> StepResult:
        return self.value
