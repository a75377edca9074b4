"""Which graph a step runs: full, piecewise or none, and the size it is padded to."""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

from compiler.config import CompilationConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchDescriptor:
    num_tokens: int
    uniform_decode: bool  # every request contributes exactly one token


@dataclass(frozen=True)
class Dispatch:
    mode: str  # "full" | "piecewise" | "none"
    padded_tokens: int


class GraphDispatcher:
    def __init__(self, config: CompilationConfig, max_tokens: int, platform_has_graphs: bool) -> None:
        self.sizes = config.resolved_capture_sizes(max_tokens)
        mode = config.graph_mode
        if mode != "none" and not platform_has_graphs:
            logger.info("graph_mode=%s requested, but this platform has no static graphs: running %s", mode,
                        "the compiled pieces" if config.mode == "compile" else "eagerly")
            mode = "none"
        if mode in ("piecewise", "full_and_piecewise") and config.mode != "compile":
            logger.warning("graph_mode=%s needs mode='compile' (pieces come from the compiler); using %s", mode,
                           "full" if mode == "full_and_piecewise" else "none")
            mode = "full" if mode == "full_and_piecewise" else "none"
        self.full = mode in ("full", "full_and_piecewise")
        self.piecewise = mode in ("piecewise", "full_and_piecewise")

    @property
    def enabled(self) -> bool:
        return (self.full or self.piecewise) and bool(self.sizes)

    def pad(self, num_tokens: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_tokens)
        return self.sizes[i] if i < len(self.sizes) else None

    def dispatch(self, batch: BatchDescriptor) -> Dispatch:
        padded = self.pad(batch.num_tokens) if self.enabled else None
        if padded is None:
            return Dispatch("none", batch.num_tokens)
        if self.full and batch.uniform_decode:
            return Dispatch("full", padded)
        if self.piecewise:
            return Dispatch("piecewise", padded)
        return Dispatch("none", batch.num_tokens)

    def disable_full(self, reason: str) -> None:
        logger.warning("full graphs disabled (%s); falling back to %s", reason,
                       "piecewise" if self.piecewise else "eager")
        self.full = False

    def disable_piecewise(self, reason: str) -> None:
        logger.warning("piecewise graphs disabled (%s); running the compiled pieces without graphs", reason)
        self.piecewise = False
