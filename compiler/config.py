"""CompilationConfig: what to compile, how, and which graphs to capture; validated, JSON-loadable, hashable."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from runtime.platforms import current_platform
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


# Piecewise graphs stop at 512 tokens, vLLM's default cap: past that a step's pieces are long enough that
# launching them should cost little next to their work, and each size is one graph per piece. (Not yet
# measured here: which sizes pay is an open item of issue 21.)
MAX_PIECEWISE_CAPTURE = 512


def default_capture_sizes(max_size: int = MAX_PIECEWISE_CAPTURE) -> list[int]:
    """Piecewise graphs' token counts: powers of two to 64, then steps of 32 to 256 and of 64 to 512, so a
    step is padded by at most half under 64 tokens (where launches, not FLOPs, set the time) and by at
    most a seventh past 256. 17 sizes where a step-of-8 ladder had 67."""
    ladder = {1, 2, 4, 8, 16, 32, 64, *range(96, 257, 32), *range(320, MAX_PIECEWISE_CAPTURE + 1, 64)}
    return sorted(s for s in ladder if s <= max_size)


def default_decode_capture_sizes(max_seqs: int) -> list[int]:
    """Full graphs' batch sizes (uniform decode: one token per sequence): 1, 2, 4, then steps of 8 to 256
    and of 16 beyond, and ``max_seqs`` itself. Decode steps are launch-bound and padding one costs a whole
    forward's weight reads per extra row only in compute, so their ladder stays fine."""
    ladder = {1, 2, 4, *range(8, 257, 8), *range(272, max_seqs + 1, 16), max_seqs}
    return sorted(s for s in ladder if s <= max_seqs)


@dataclass
class CompilationConfig:
    # None: the platform's default. CUDA and Ascend compile and capture full_and_piecewise (graphs are
    # most of decode speed there: docs/perf.md); the CPU runs eagerly (no static graphs to capture, and
    # Inductor's first C++ compile costs more than a CPU session gains). graph_mode left None with an
    # explicit mode="eager" means no graphs.
    mode: str | None = None
    graph_mode: str | None = None
    backend: str | None = None  # None = the platform's default ("inductor" on CPU and CUDA)
    splitting_ops: list[str] = field(default_factory=lambda: list(DEFAULT_SPLITTING_OPS))
    # Piecewise graphs' token counts; None = default_capture_sizes(). Also the full graphs' sizes when
    # full_capture_sizes is None and these are given.
    capture_sizes: list[int] | None = None
    # Full graphs' batch sizes (uniform decode steps); None = capture_sizes if given, else
    # default_decode_capture_sizes(max_num_seqs).
    full_capture_sizes: list[int] | None = None
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
        if self.mode is None:
            self.mode = current_platform.default_compile_mode
        if self.graph_mode is None:
            self.graph_mode = current_platform.default_graph_mode if self.mode == "compile" else "none"
        self._check_choice("mode", MODES)
        self._check_choice("graph_mode", GRAPH_MODES)
        if self.backend is not None and not isinstance(self.backend, str):
            raise ValueError(f"backend must be a string, got {self.backend!r}")
        for name in ("capture_sizes", "full_capture_sizes", "compile_sizes"):
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
    def eager(cls) -> "CompilationConfig":
        """No compilation and no graphs, on every platform (``enforce_eager``; eager baselines)."""
        return cls(mode="eager", graph_mode="none")

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

    def piecewise_sizes(self, max_tokens: int | None = None) -> list[int]:
        """Token counts of piecewise graphs, up to ``max_tokens`` (the step's token budget)."""
        sizes = sorted(set(self.capture_sizes if self.capture_sizes is not None else default_capture_sizes()))
        return [s for s in sizes if max_tokens is None or s <= max_tokens]

    def full_sizes(self, max_seqs: int, max_tokens: int) -> list[int]:
        """Batch sizes of full (uniform decode) graphs: a full graph pads a step to one sequence per
        token, so it is bounded by both the sequence and the token budget."""
        given = self.full_capture_sizes if self.full_capture_sizes is not None else self.capture_sizes
        sizes = sorted(set(given)) if given is not None else default_decode_capture_sizes(max_seqs)
        return [s for s in sizes if s <= min(max_seqs, max_tokens)]

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
