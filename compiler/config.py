"""CompilationConfig: what to compile, how, and which graphs to capture; validated, JSON-loadable, hashable."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

MODES = ("eager", "compile")
GRAPH_MODES = ("none", "piecewise", "full", "full_and_piecewise")
DEFAULT_SPLITTING_OPS = ("graphmode::attention",)
# Fields that change generated code (and so the compile-cache key); paths and debugging do not.
_CODE_FIELDS = ("mode", "graph_mode", "backend", "splitting_ops", "compile_sizes", "passes")


CACHE_ROOT_ENV = "GRAPHMODE_CACHE_ROOT"


def resolve_cache_dir(cache_dir: str | None) -> str | None:
    """Where compiled pieces are cached: ``cache_dir`` when given ("" for nowhere), else $GRAPHMODE_CACHE_ROOT
    (set and empty: nowhere), else ~/.cache/graphmode. Entries are keyed by config, passes, model code, torch
    version and platform (compiler/cache.py), so one root serves every model and config."""
    if cache_dir is not None:
        return cache_dir or None
    root = os.environ.get(CACHE_ROOT_ENV)
    if root is not None:
        return root or None
    return os.path.join(os.path.expanduser("~"), ".cache", "graphmode")


def default_capture_sizes(max_size: int = 512) -> list[int]:
    """vLLM-like ladder: 1, 2, 4, then steps of 8 up to ``max_size``."""
    return sorted({1, 2, 4, *range(8, max_size + 1, 8)})


@dataclass
class CompilationConfig:
    mode: str = "eager"
    graph_mode: str = "none"
    backend: str | None = None  # None = the platform's default ("inductor" on CPU and CUDA)
    splitting_ops: list[str] = field(default_factory=lambda: list(DEFAULT_SPLITTING_OPS))
    capture_sizes: list[int] | None = None  # None = default_capture_sizes(); only used with graphs
    compile_sizes: list[int] = field(default_factory=list)  # extra static-shape compiles (inductor)
    passes: list[str] = field(default_factory=lambda: ["default"])
    # Compile cache: None = the default root (resolve_cache_dir), "" = none; a cached piece loads instead of compiling.
    cache_dir: str | None = None
    dump_dir: str | None = None
    debug: bool = False  # keep Dynamo's guards: a recompile becomes a clear error instead of silence
    encoder: "CompilationConfig | None" = None

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = CompilationConfig.from_dict(self.encoder)
        self._check_choice("mode", MODES)
        self._check_choice("graph_mode", GRAPH_MODES)
        if self.backend is not None and not isinstance(self.backend, str):
            raise ValueError(f"backend must be a string, got {self.backend!r}")
        for name in ("capture_sizes", "compile_sizes"):
            sizes = getattr(self, name)
            if sizes is not None and (not isinstance(sizes, list) or
                                      not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)):
                raise ValueError(f"{name} must be a list of positive integers, got {sizes!r}")
        for name in ("splitting_ops", "passes"):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"{name} must be a list of strings, got {values!r}")
        bad_ops = [op for op in self.splitting_ops if "::" not in op]
        if bad_ops:
            raise ValueError(f"splitting_ops entries must look like 'namespace::op', got {bad_ops}")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompilationConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a compilation config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown compilation config field(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "CompilationConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"compilation config is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["encoder"] = self.encoder.to_dict() if self.encoder else None
        return out

    # ---- derived --------------------------------------------------------------------------
    @property
    def is_eager(self) -> bool:
        """No compilation and no static graphs."""
        return self.mode == "eager" and self.graph_mode == "none"

    def resolved_backend(self, platform_default: str) -> str:
        return self.backend or platform_default

    def resolved_capture_sizes(self, max_size: int | None = None) -> list[int]:
        sizes = sorted(set(self.capture_sizes if self.capture_sizes is not None else default_capture_sizes()))
        return [s for s in sizes if max_size is None or s <= max_size]

    def code_hash(self) -> str:
        """Stable hash of the fields that change generated code (part of the compile-cache key)."""
        payload = {name: getattr(self, name) for name in _CODE_FIELDS}
        payload["encoder"] = self.encoder.code_hash() if self.encoder else None
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def for_encoder(self) -> "CompilationConfig":
        """The config a multimodal encoder uses: its own if set, else the decoder's."""
        return self.encoder or self


_active: list[CompilationConfig] = []


@contextlib.contextmanager
def use_config(config: CompilationConfig) -> Iterator[CompilationConfig]:
    """Models constructed inside this block pick up ``config`` (see ``support_torch_compile``)."""
    _active.append(config)
    try:
        yield config
    finally:
        _active.pop()


def current_config() -> CompilationConfig | None:
    return _active[-1] if _active else None
