"""graphmode's public API: ``from runtime import LLM, SamplingParams``.

The names load on first use (PEP 562), so importing a low layer such as ``runtime.platforms`` does
not pull in the whole engine, models and transformers with it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runtime.logger import configure_default_logging

if TYPE_CHECKING:
    from runtime.contracts.config import EngineConfig
    from runtime.contracts.sampling_params import RequestOutputKind, SamplingParams
    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.llm import LLM
    from runtime.engine.outputs import CompletionOutput, RequestOutput

_PUBLIC = {
    "LLM": "runtime.engine.llm",
    "SamplingParams": "runtime.contracts.sampling_params",
    "RequestOutputKind": "runtime.contracts.sampling_params",
    "AsyncEngine": "runtime.engine.async_engine",
    "RequestOutput": "runtime.engine.outputs",
    "CompletionOutput": "runtime.engine.outputs",
    "EngineConfig": "runtime.contracts.config",
}

configure_default_logging()

__all__ = ["AsyncEngine", "CompletionOutput", "EngineConfig", "LLM", "RequestOutput", "RequestOutputKind",
           "SamplingParams"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
