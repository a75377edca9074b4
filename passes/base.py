"""The pass interface and the registry (kept apart from the manager so pass modules can import it)."""
from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch


class GraphPass:
    """One rewrite of an FX graph. Subclasses set ``name`` and implement ``__call__``."""

    name: str = ""

    def __call__(self, graph: torch.fx.Graph) -> int:
        """Rewrite ``graph`` in place; returns how many matches were rewritten."""
        raise NotImplementedError

    def source_objects(self) -> list[Any]:
        """Functions or modules besides the class whose source decides what the pass does.

        By default the pass's module (helpers next to the class change its behaviour too).
        """
        module = inspect.getmodule(type(self))
        return [module] if module is not None else []

    def uuid(self) -> str:
        digest = hashlib.sha256()
        for obj in [type(self), *self.source_objects()]:
            digest.update(inspect.getsource(obj).encode())
        return digest.hexdigest()


PASSES: dict[str, type[GraphPass]] = {}


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: make a pass available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if PASSES.get(cls.name, cls) is not cls:
        raise ValueError(f"two passes named {cls.name!r}: {PASSES[cls.name].__name__} and {cls.__name__}")
    PASSES[cls.name] = cls
    return cls
