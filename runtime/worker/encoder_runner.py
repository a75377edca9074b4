"""Runs the vision encoder for the engine: packed image batches, patch budgets, static graphs.

With static graphs (encoder config ``graph_mode`` other than "none", on a platform that has them)
the whole encoder forward is captured once per patch budget. A batch is padded up to the nearest
budget: the padding patches are zeros in a segment of their own, so they never mix with an image.
Inputs live in persistent buffers (pixels, patch positions, ``cu_seqlens`` of a fixed length whose
unused tail repeats the budget), so a replay reads this batch's data at the captured addresses.
On a platform without static graphs, batches run the compiled (or eager) encoder at their exact
size, with one log line saying so, the way the decoder degrades.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from compiler.config import CompilationConfig
from compiler.graphs import GraphRuntime, StaticGraphRunner
from models.qwen2_vl_vision import encoder_inputs
from runtime.platforms import current_platform

logger = logging.getLogger(__name__)

_DEFAULT_BUDGET_LADDER = (256, 512, 1024, 2048, 4096, 8192, 16384)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def patch_budgets(config: CompilationConfig, explicit: bool, max_patches: int, unit: int) -> list[int]:
    """Capture sizes in patches, multiples of ``unit`` (one merge block), the largest = ``max_patches``.

    ``explicit``: the encoder has a config of its own, so its capture_sizes count patches (the
    decoder's count tokens and are not reused).
    """
    max_patches = _round_up(max_patches, unit)
    ladder = config.capture_sizes if explicit and config.capture_sizes else _DEFAULT_BUDGET_LADDER
    sizes = {_round_up(s, unit) for s in ladder if s < max_patches}
    return sorted(sizes | {max_patches})


class EncoderRunner:
    def __init__(self, encoder: torch.nn.Module, max_patches: int, device: torch.device,
                 decoder_config: CompilationConfig | None = None) -> None:
        self.encoder, self.device = encoder, device
        self.merge = encoder.merge_size
        unit = self.merge ** 2
        self.config: CompilationConfig = getattr(encoder, "compilation_config", None) or CompilationConfig()
        explicit = decoder_config is not None and decoder_config.encoder is not None
        self.budgets = patch_budgets(self.config, explicit, max_patches, unit)
        self.max_patches = self.budgets[-1]
        self.runs = 0  # encoder forwards (tests: chunked prefill must not re-run it)
        self.graphs: StaticGraphRunner | None = None
        wants_graphs = self.config.graph_mode != "none"
        if wants_graphs and not current_platform.supports_static_graphs:
            logger.info("encoder graph_mode=%s requested, but this platform has no static graphs: running the "
                        "%s encoder at each batch's size", self.config.graph_mode,
                        "compiled" if self.config.mode == "compile" else "eager")
        elif wants_graphs:
            self._allocate_buffers(encoder.patch_dim)
            self.runtime = GraphRuntime(current_platform, current_platform.graph_pool_handle(),
                                        debug=self.config.debug)
            self.graphs = StaticGraphRunner(self._forward, "encoder", frozenset(self.budgets), kind="encoder")

    def _allocate_buffers(self, patch_dim: int) -> None:
        n, dtype = self.max_patches, next(self.encoder.parameters()).dtype
        self.pixel_buffer = torch.zeros(n, patch_dim, dtype=dtype, device=self.device)
        self.position_buffer = torch.zeros(n, 2, dtype=torch.int64, device=self.device)
        # One segment per frame at most (a frame covers at least one merge block), plus padding's.
        self.cu_buffer = torch.zeros(n // self.merge ** 2 + 2, dtype=torch.int32, device=self.device)

    def _forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor,
                 cu_seqlens: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values, position_ids, cu_seqlens)

    def budget_for(self, num_patches: int) -> int:
        for budget in self.budgets:
            if budget >= num_patches:
                return budget
        raise ValueError(f"{num_patches} image patches exceed the largest encoder budget {self.max_patches}")

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Merged embeddings of the packed images [patches / merge**2, hidden] (a fresh tensor)."""
        inputs = encoder_inputs(pixel_values.to(self.device), grids, self.merge)
        n = inputs.num_patches
        budget = self.budget_for(n)
        self.runs += 1
        if self.graphs is None:
            return self._forward(inputs.pixel_values, inputs.position_ids, inputs.cu_seqlens)
        self.pixel_buffer[:n].copy_(inputs.pixel_values)
        self.pixel_buffer[n:budget].zero_()
        self.position_buffer[:n].copy_(inputs.position_ids)
        self.position_buffer[n:budget].zero_()
        cu = inputs.cu_seqlens
        self.cu_buffer[:cu.numel()].copy_(cu)
        self.cu_buffer[cu.numel():].fill_(budget)  # padding rows: one segment; the rest empty
        out = self.graphs(self.runtime, budget, (self.pixel_buffer[:budget], self.position_buffer[:budget],
                                                 self.cu_buffer))
        # A replay's output buffer is reused by the next replay: hand out a copy.
        return out[: n // self.merge ** 2].clone()

    def dummy_batch(self, num_patches: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """Zero pixels in one image of ``num_patches`` patches (a 1-merge-block-high strip)."""
        width = num_patches // self.merge
        return torch.zeros(num_patches, self.encoder.patch_dim, device=self.device), [(1, self.merge, width)]

    def capture(self) -> None:
        """Warm up and capture every budget, largest first (later ones reuse its pool)."""
        if self.graphs is None:
            return
        for budget in sorted(self.budgets, reverse=True):
            for _ in range(2):  # the first call at a size warms up, the second captures
                self.run(*self.dummy_batch(budget))
        self.runs = 0
        logger.info("encoder: captured %d static graphs (patch budgets %s)", len(self.graphs.entries), self.budgets)

    def describe(self) -> dict[str, Any]:
        return {"budgets": self.budgets, "graphs": self.graphs is not None, "mode": self.config.mode}
