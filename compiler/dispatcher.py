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
    """Two ladders: full graphs for uniform decode steps (one token per sequence, up to ``max_seqs``) and
    piecewise graphs for the rest (up to ``max_tokens``); each DBO micro-batch slot has the part of both
    that half a step can fill."""

    def __init__(self, config: CompilationConfig, max_tokens: int, max_seqs: int, platform_has_graphs: bool) -> None:
        mode = config.graph_mode
        if mode != "none" and not platform_has_graphs:
            logger.info("graph_mode=%s requested, but this platform has no static graphs: running %s", mode,
                        "the compiled pieces" if config.mode == "compile" else "eagerly")
            mode = "none"
        if mode in ("piecewise", "full_and_piecewise") and config.mode != "compile":
            logger.warning("graph_mode=%s needs mode='compile' (pieces come from the compiler); using %s", mode,
                           "full" if mode == "full_and_piecewise" else "none")
            mode = "full" if mode == "full_and_piecewise" else "none"
        self.piecewise_sizes = config.piecewise_sizes(max_tokens) if mode in ("piecewise", "full_and_piecewise") else []
        self.full_sizes = config.full_sizes(max_seqs, max_tokens) if mode in ("full", "full_and_piecewise") else []
        # A DBO micro-batch holds at most half the step's tokens (rounded up): its graphs go up to the
        # first size that covers that.
        self.ubatch_piecewise_sizes = _covering(self.piecewise_sizes, (max_tokens + 1) // 2)
        self.ubatch_full_sizes = _covering(self.full_sizes, (min(max_seqs, max_tokens) + 1) // 2)

    @property
    def full(self) -> bool:
        return bool(self.full_sizes)

    @property
    def piecewise(self) -> bool:
        return bool(self.piecewise_sizes)

    @property
    def enabled(self) -> bool:
        return self.full or self.piecewise

    def sizes(self, mode: GraphMode, ubatch: int | None = None) -> list[int]:
        """The ladder of ``mode`` ("full" or "piecewise") for whole steps or a micro-batch slot."""
        if mode == "full":
            return self.full_sizes if ubatch is None else self.ubatch_full_sizes
        return self.piecewise_sizes if ubatch is None else self.ubatch_piecewise_sizes

    def dispatch(self, batch: BatchDescriptor) -> Dispatch:
        if batch.uniform_decode:
            padded = _pad(self.sizes("full", batch.ubatch), batch.num_tokens)
            if padded is not None:
                return Dispatch("full", padded, batch)
        padded = _pad(self.sizes("piecewise", batch.ubatch), batch.num_tokens)
        if padded is not None:
            return Dispatch("piecewise", padded, batch)
        return Dispatch("none", batch.num_tokens, batch)

    def disable_full(self, reason: str) -> None:
        logger.warning("full graphs disabled (%s); falling back to %s", reason,
                       "piecewise" if self.piecewise else "eager")
        self.full_sizes, self.ubatch_full_sizes = [], []

    def disable_piecewise(self, reason: str) -> None:
        logger.warning("piecewise graphs disabled (%s); the compiled pieces run without graphs", reason)
        self.piecewise_sizes, self.ubatch_piecewise_sizes = [], []


def _pad(sizes: list[int], num_tokens: int) -> int | None:
    """The smallest size that holds ``num_tokens``, or None past the ladder."""
    i = bisect.bisect_left(sizes, num_tokens)
    return sizes[i] if i < len(sizes) else None


def _covering(sizes: list[int], limit: int) -> list[int]:
    """``sizes`` up to and including the first that holds ``limit``."""
    return sizes[: bisect.bisect_left(sizes, limit) + 1]
