"""A compiled piece: one callable for the dynamic token count plus optional per-size ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from compiler.graphs import StaticGraphRunner
from runtime.forward_context import current_forward_context


@dataclass(frozen=True)
class SizeArg:
    """Where a piece finds the token count among its arguments."""
    index: int
    is_symint: bool  # an int argument (a SymInt at trace time) rather than a tensor's dim 0

    def read(self, args: tuple[Any, ...]) -> int:
        value = args[self.index]
        return int(value) if self.is_symint else value.shape[0]


def find_size_arg(fake_args: list[Any]) -> SizeArg | None:
    """The first argument carrying a symbolic size: a SymInt, else a tensor with a symbolic dim 0."""
    for i, arg in enumerate(fake_args):
        if isinstance(arg, torch.SymInt):
            return SizeArg(i, True)
    for i, arg in enumerate(fake_args):
        if isinstance(arg, torch.Tensor) and arg.dim() > 0 and isinstance(arg.shape[0], torch.SymInt):
            return SizeArg(i, False)
    return None


class PiecewiseBackend:
    """Runs a piece, picking the size-specialised compile when one exists for this token count."""

    def __init__(self, name: str, general: Callable, by_size: dict[int, Callable], size_arg: SizeArg | None,
                 capture_sizes: list[int] | None = None) -> None:
        self.name = name
        self.general = general
        self.by_size = by_size
        self.size_arg = size_arg
        # Set when piecewise graphs are on: replays this piece per capture size on "piecewise" steps.
        self.graphs = (StaticGraphRunner(self._run, name, frozenset(capture_sizes), kind="piecewise")
                       if capture_sizes and size_arg is not None else None)

    def num_tokens(self, args: tuple[Any, ...]) -> int | None:
        return self.size_arg.read(args) if self.size_arg is not None else None

    def __call__(self, *args: Any) -> Any:
        if self.graphs is not None:
            ctx = current_forward_context()
            if ctx is not None and ctx.graph_mode == "piecewise" and ctx.graph_runtime is not None:
                return self.graphs(ctx.graph_runtime, self.num_tokens(args), args)
        return self._run(*args)

    def _run(self, *args: Any) -> Any:
        if self.by_size:
            return self.by_size.get(self.num_tokens(args), self.general)(*args)
        return self.general(*args)
