"""graphmode's OpenAI-compatible HTTP server: ``python -m runtime.serve``.

One concept per module: ``protocol`` (request/response models), ``preprocess`` (prompts and sampling
parameters), ``completions`` / ``chat`` (the two generation endpoints), ``streaming`` (SSE and client
disconnects), ``errors`` (OpenAI-shaped errors), ``middleware`` (API key, body size), ``metrics``
(Prometheus), ``app`` (the FastAPI factory), ``cli`` (the flags), ``server`` (bind, build the engine,
serve, shut down) and ``data_parallel`` (engine cores elsewhere, several API server processes).
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_app", "ServerSettings"]


def __getattr__(name: str) -> Any:
    # Imported when asked for: `python -m runtime.serve` must set up the metrics' multiprocess mode before
    # prometheus_client is first imported, and --help needs neither FastAPI nor torch.
    if name == "create_app":
        from runtime.serve.app import create_app
        return create_app
    if name == "ServerSettings":
        from runtime.serve.settings import ServerSettings
        return ServerSettings
    raise AttributeError(f"module 'runtime.serve' has no attribute {name!r}")
