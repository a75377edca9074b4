"""What the engine hands back: one RequestOutput per request (with n completions), and its load (EngineStats)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    # Per generated token: (logprob of the sampled token, top alternatives or None), when asked for.
    logprobs: list[tuple[float, list[tuple[int, float]] | None]] | None = None
    stop_reason: str | None = None  # the stop string that ended it, or a detail for aborts

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    engine_index: int = 0  # the data-parallel engine core that ran it
    # A prefill instance's answer: where a decode instance fetches this prompt's KV (runtime/engine/kv_connector.py).
    kv_transfer_params: dict | None = None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    kv_used_blocks: int
    kv_total_blocks: int
    prefix_cache_hit_rate: float
    num_steps: int
    graph_replays: int = 0  # static device graph replays (rank 0's, under tensor parallelism)
    eager_steps: int = 0  # forwards run without a graph although graphs were enabled
    alive: bool = True  # False: this engine core died (data parallelism with tolerated failures)
    prompt_tokens_computed: int = 0  # prompt tokens run through the model (not from the prefix cache or a producer)
    kv_sent_tokens: int = 0  # prompt tokens whose KV went to a decode instance
    kv_received_tokens: int = 0  # prompt tokens whose KV came from a prefill instance
