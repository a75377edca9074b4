"""A compiled piece: one callable for the dynamic token count plus optional per-size ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


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

    def __init__(self, name: str, general: Callable, by_size: dict[int, Callable], size_arg: SizeArg | None) -> None:
        self.name = name
        self.general = general
        self.by_size = by_size
        self.size_arg = size_arg

    def num_tokens(self, args: tuple[Any, ...]) -> int | None:
        return self.size_arg.read(args) if self.size_arg is not None else None

    def __call__(self, *args: Any) -> Any:
        if self.by_size:
            fn = self.by_size.get(self.num_tokens(args), self.general)
            return fn(*args)
        return self.general(*args)
