"""Server-side limits and identity, fixed at start-up (the engine's own limits live in EngineConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1 << 20


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: list[str] = field(default_factory=lambda: ["graphmode"])
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_n: int = 16  # completions per prompt
    max_batch_prompts: int = 64  # prompts in one /v1/completions call
    max_body_bytes: int = 4 * MiB
    max_stop_strings: int = 16
    created: int = 0  # unix time the server started (reported by /v1/models)
    profiler_dir: str | None = None  # where /start_profile's traces go; None turns the profiler endpoints off
    data_parallel_size: int = 1  # engine cores behind the server (the X-data-parallel-rank header's range)

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(isinstance(n, str) and n for n in self.served_model_names):
            raise ValueError("served_model_names must be a non-empty list of non-empty strings")
        for name in ("max_n", "max_batch_prompts", "max_body_bytes", "max_stop_strings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def model_name(self) -> str:
        """The name responses report."""
        return self.served_model_names[0]
