"""Which graph a step runs: full, piecewise or none, and the size it is padded to."""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

from compiler.config import CompilationConfig
from runtime.forward_context import BatchDescriptor, GraphMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatch:
    mode: GraphMode
    padded_tokens: int
    batch: BatchDescriptor  # what was asked for

    @property
    def ubatch(self) -> int | None:
        """Which micro-batch slot's graphs to replay."""
        return self.batch.ubatch


class GraphDispatcher:
    def __init__(self, config: CompilationConfig, max_tokens: int, platform_has_graphs: bool) -> None:
        self.sizes = config.resolved_capture_sizes(max_tokens)
        # A DBO micro-batch holds at most half the step's tokens (rounded up): its graphs are
        # captured up to the first capture size that covers that.
        half = (max_tokens + 1) // 2
        self.ubatch_sizes = self.sizes[: bisect.bisect_left(self.sizes, half) + 1]
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

    def pad(self, num_tokens: int, ubatch: int | None = None) -> int | None:
        sizes = self.sizes if ubatch is None else self.ubatch_sizes
        i = bisect.bisect_left(sizes, num_tokens)
        return sizes[i] if i < len(sizes) else None

    def dispatch(self, batch: BatchDescriptor) -> Dispatch:
        padded = self.pad(batch.num_tokens, batch.ubatch) if self.enabled else None
        if padded is None:
            return Dispatch("none", batch.num_tokens, batch)
        if self.full and batch.uniform_decode:
            return Dispatch("full", padded, batch)
        if self.piecewise:
            return Dispatch("piecewise", padded, batch)
        return Dispatch("none", batch.num_tokens, batch)

    def disable_full(self, reason: str) -> None:
        logger.warning("full graphs disabled (%s); falling back to %s", reason,
                       "piecewise" if self.piecewise else "eager")
        self.full = False
