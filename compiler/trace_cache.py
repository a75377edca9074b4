"""The traced graph, saved beside the compiled pieces, so a warm start skips Dynamo.

Everything after Dynamo's trace (split, passes, compile) is keyed and cached (compiler/cache.py), but
the trace itself is seconds for a 1B model, the largest part of a warm start left. A cold start saves
what the backend and ``DirectCall`` need to run without it: the FX graph without node metadata
(torch's ``GraphPickler``), each graph input's source expression (``L['self']._modules[...]``,
``L['input_ids']``) with its fake value's shape, stride and dtype (symbolic dims kept as expressions),
and the source files Dynamo traced with a hash of each. A warm start with the same key rebuilds fake
inputs, hands the graph to the backend as Dynamo would, and calls it through ``DirectCall``.

The key is the compile cache's global key (config, passes, model file, torch version, platform), the
model's fingerprint (every parameter's and buffer's name, shape and dtype, every module's plain
attributes: what Dynamo bakes into the graph as constants) and the first call's argument layout. An
entry whose traced files changed since, or that does not load, is traced again with one log line.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import pickle
from typing import Any

import torch

logger = logging.getLogger(__name__)

_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, enum.Enum)
_FORMAT = 2  # bump when the entry's layout changes


@dataclasses.dataclass
class ValueSpec:
    """A fake value as text: a tensor's shape, stride, storage offset (ints or expressions of the shape
    symbols), dtype and device; a SymInt's expression; a sequence of values; or a constant."""
    kind: str  # "tensor", "symint", "seq", "const"
    shape: list[str] = dataclasses.field(default_factory=list)
    stride: list[str] = dataclasses.field(default_factory=list)
    offset: str = "0"  # a view into a persistent buffer has a symbolic one
    dtype: str = ""
    device: str = ""
    expr: str = ""
    items: list["ValueSpec | None"] = dataclasses.field(default_factory=list)
    const: Any = None


@dataclasses.dataclass
class InputSpec:
    """One graph input: where it comes from, and what Dynamo saw there."""
    source: str
    value: ValueSpec


@dataclasses.dataclass
class TracedGraph:
    graph: bytes  # GraphPickler's bytes of the metadata-free graph module
    inputs: list[InputSpec]
    values: list[ValueSpec | None]  # every node's example value, in graph order (what the split reads)
    single_output: bool  # the forward returns the graph's only output (else the tuple)
    none_args: list[str]  # arguments that were None when traced
    symbol_hints: dict[str, int]  # each shape symbol's value on the traced call
    files: dict[str, str]  # traced source file -> sha256 of its text
    format: int = _FORMAT


def _file_hash(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def traced_files() -> dict[str, str]:
    """The source files Dynamo inlined in the trace now running (torch's own excluded: its version is in
    the key), with their hashes. Empty outside a trace or where torch does not record them."""
    code = torch._guards.TracingContext.get_traced_code() or []
    torch_dir = os.path.dirname(torch.__file__)
    files = {}
    for c in code:
        path = c.co_filename
        if path not in files and os.path.isfile(path) and not path.startswith(torch_dir):
            files[path] = _file_hash(path)
    return files


def module_fingerprint(module: torch.nn.Module) -> str:
    """What of ``module`` a trace bakes in: tensor names/shapes/dtypes and every plain attribute
    (sizes, eps, flags) of every submodule, dataclass attributes (a parallel context) included."""
    parts = []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        parts.append(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device.type}")
    for name, sub in module.named_modules():
        parts.append(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}")
        for attr, value in sorted(vars(sub).items()):
            if attr.startswith("_"):  # nn.Module's own state: parameters, buffers and submodules are above
                continue
            if isinstance(value, _PLAIN) or (isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)):
                parts.append(f"{name}.{attr}={value!r}")
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                parts.append(f"{name}.{attr}={value!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def argument_layout(bound: dict[str, Any]) -> str:
    """The call's arguments as the trace saw them: tensors by rank/dtype/device, the rest by value."""
    parts = []
    for name, value in bound.items():
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}:T{value.dim()}:{value.dtype}:{value.device.type}")
        else:
            parts.append(f"{name}:{value!r}")
    return ";".join(parts)


def value_spec(value: Any, hints: dict[str, int]) -> ValueSpec | None:
    """``value`` as a ``ValueSpec`` (None for what a split never reads); the hints of its symbols go to ``hints``."""
    if isinstance(value, torch.SymInt):
        hints.update(_hints(value))
        return ValueSpec("symint", expr=str(value.node.expr))
    if isinstance(value, torch.Tensor):
        for d in (*value.shape, *value.stride(), value.storage_offset()):
            if isinstance(d, torch.SymInt):
                hints.update(_hints(d))
        return ValueSpec("tensor", [str(d) for d in value.shape], [str(s) for s in value.stride()],
                         str(value.storage_offset()), str(value.dtype).removeprefix("torch."), str(value.device))
    if isinstance(value, (tuple, list)):
        return ValueSpec("seq", items=[value_spec(v, hints) for v in value])
    if isinstance(value, (bool, int, float, type(None))):
        return ValueSpec("const", const=value)
    return None


def describe_graph(gm: torch.fx.GraphModule, sources: list[str]) -> tuple[list[InputSpec], list[ValueSpec | None],
                                                                          dict[str, int]]:
    """Each placeholder's source and spec, every node's spec, and the hint of every shape symbol."""
    hints: dict[str, int] = {}
    values = [value_spec(n.meta.get("example_value"), hints) for n in gm.graph.nodes]
    placeholders = [(n, v) for n, v in zip(gm.graph.nodes, values) if n.op == "placeholder"]
    inputs = []
    for (node, spec), source in zip(placeholders, sources):
        if spec is None or spec.kind not in ("tensor", "symint"):
            raise ValueError(f"graph input {source} has no example value Dynamo recorded")
        inputs.append(InputSpec(source, spec))
    return inputs, values, hints


def _hints(value: torch.SymInt) -> dict[str, int]:
    shape_env = value.node.shape_env
    values = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val  # renamed in torch 2.12
    return {str(s): int(values[s]) for s in value.node.expr.free_symbols}


def pickle_graph(gm: torch.fx.GraphModule) -> bytes:
    """The graph alone: a fresh module around it (Dynamo's carries unpicklable state) and no node
    metadata (fake values are rebuilt from the specs; stack traces are not needed to run it)."""
    from torch.fx._graph_pickler import GraphPickler, Options  # imports Inductor: only when a trace is saved

    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    bare = torch.fx.GraphModule({}, graph)
    return GraphPickler.dumps(bare, Options(ops_filter=None, node_metadata_key_filter=lambda key: False))


class FakeValues:
    """Builds fake values from specs, with fresh shape symbols standing for the saved ones."""

    def __init__(self, symbol_hints: dict[str, int]) -> None:
        from torch._dynamo.source import ConstantSource
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
        self.symbols = {}
        for name, hint in sorted(symbol_hints.items()):
            symbol = shape_env.create_symbol(hint, ConstantSource(name))
            self.symbols[name] = shape_env.create_symintnode(symbol, hint=hint)

    def _int(self, text: str) -> Any:  # "64", "s72", "64*s72": SymInt arithmetic rebuilds it on the new symbols
        return eval(text, {"__builtins__": {}}, self.symbols)

    def build(self, spec: ValueSpec | None) -> Any:
        if spec is None:
            return None
        if spec.kind == "symint":
            return self._int(spec.expr)
        if spec.kind == "seq":
            return tuple(self.build(s) for s in spec.items)
        if spec.kind == "const":
            return spec.const
        shape, stride = [self._int(d) for d in spec.shape], [self._int(s) for s in spec.stride]
        dtype = getattr(torch, spec.dtype)
        with self.mode:
            if spec.offset == "0":
                return torch.empty_strided(shape, stride, dtype=dtype, device=spec.device)
            offset = self._int(spec.offset)  # a view into a larger buffer: a base that holds it
            extent = offset + sum((n - 1) * st for n, st in zip(shape, stride)) + 1
            return torch.empty(extent, dtype=dtype, device=spec.device).as_strided(shape, stride, offset)


def load_graph(entry: TracedGraph) -> tuple[torch.fx.GraphModule, list[Any], Any]:
    """The saved graph with Dynamo's ``example_value`` on every node again (the split reads them: a piece
    that uses a symbolic size gets the size symbol as an input, and without them the pieces, and their
    cache keys, would differ from a cold start's), fake inputs for it and their fake mode."""
    from torch.fx._graph_pickler import GraphPickler

    fakes = FakeValues(entry.symbol_hints)
    gm = GraphPickler.loads(entry.graph, fakes.mode)
    nodes = list(gm.graph.nodes)
    if len(nodes) != len(entry.values):
        raise ValueError(f"the saved graph has {len(nodes)} nodes and {len(entry.values)} values")
    for node, spec in zip(nodes, entry.values):
        value = fakes.build(spec)
        if value is not None:
            node.meta["example_value"] = value
    inputs = [n.meta["example_value"] for n in nodes if n.op == "placeholder"]
    return gm, inputs, fakes.mode


class TraceCache:
    """Traced graphs under ``<compile cache directory>/traces``, one file per key."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.join(directory, "traces")
        os.makedirs(self.directory, exist_ok=True)

    @staticmethod
    def key(module: torch.nn.Module, bound: dict[str, Any], tag: str) -> str:
        text = f"{tag}|{module_fingerprint(module)}|{argument_layout(bound)}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.trace")

    def load(self, key: str) -> TracedGraph | None:
        path = self._path(key)
        if not os.path.exists(path):
            return None
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f)
            if not isinstance(entry, TracedGraph) or entry.format != _FORMAT:
                raise ValueError("written by another version")
        except Exception as e:  # noqa: BLE001 - any unreadable entry means one more trace, never a failure
            logger.warning("traced graph %s is unreadable (%s: %s); tracing again", path, type(e).__name__,
                           str(e).splitlines()[0] if str(e) else "")
            return None
        changed = [p for p, digest in entry.files.items() if _file_hash(p) != digest]
        if changed:
            logger.info("traced graph %s is stale (%s changed since); tracing again", path,
                        ", ".join(os.path.basename(p) for p in changed[:3]))
            return None
        return entry

    def save(self, key: str, entry: TracedGraph) -> None:
        path = self._path(key)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                pickle.dump(entry, f)
            os.replace(tmp, path)
        except Exception as e:  # noqa: BLE001 - an entry that cannot be written only costs the next start
            logger.warning("could not write traced graph %s: %s", path, e)
