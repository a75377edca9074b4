"""Calling the compiled graph without Dynamo's frame evaluation after the first trace.

With guards dropped, what Dynamo still does on every call is enter its eval-frame machinery and run
the transformed bytecode, which re-reads every parameter of the model (hundreds of attribute
lookups) to build the flat argument list of the compiled graph. That costs hundreds of
microseconds per call; a decode step at batch 1 is ~2 ms on an H100.

``DirectCall`` records, during the first (traced) call, the source expression of every graph input
that Dynamo attached to the placeholders (``L['self']._modules[...]._parameters['weight']``,
``L['input_ids']``, ``L['input_ids'].size()[0]``). Inputs read from the module are resolved once;
the rest become one generated function of the call's arguments. The plan is only used after it
reproduced, object for object, the arguments and output Dynamo produced on that first call;
anything it cannot reproduce leaves the model on Dynamo's path (logged once).
"""
from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


def _source_name(node: torch.fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name  # a property in torch >= 2.12, a method before
    return name() if callable(name) else name


@dataclass
class FirstCall:
    """What the compiled graph received and returned the first time (set by ``RecordingBackend``)."""
    input_sources: list[str | None] = field(default_factory=list)
    compiled: Callable | None = None
    args: tuple | None = None
    output: Any = None
    trace: Any = None  # the graph as compiler/trace_cache.py saves it, when asked to record it


class RecordingBackend:
    """Wraps the Dynamo backend: keeps the placeholders' sources and the first call's args/output."""

    def __init__(self, backend: Callable, record_trace: bool = False) -> None:
        self.backend = backend
        self.record_trace = record_trace
        self.first = FirstCall()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        self.first.input_sources = [_source_name(n) for n in gm.graph.nodes if n.op == "placeholder"]
        if self.record_trace:
            self.first.trace = _record_trace(gm, self.first.input_sources)
        compiled = self.backend(gm, example_inputs)
        self.first.compiled = compiled
        first = self.first

        def run_and_record(*args: Any) -> Any:
            out = compiled(*args)
            if first.args is None:
                first.args, first.output = args, out
            return out

        return run_and_record


def _record_trace(gm: torch.fx.GraphModule, sources: list[str | None]) -> Any:
    """What a warm start needs of this trace (before the backend rewrites the graph), or None."""
    from compiler.trace_cache import TracedGraph, describe_graph, pickle_graph, traced_files

    try:
        if any(s is None for s in sources):
            raise ValueError("a graph input has no source")
        inputs, values, hints = describe_graph(gm, sources)
        return TracedGraph(pickle_graph(gm), inputs, values, single_output=False, none_args=[], symbol_hints=hints,
                           files=traced_files())
    except Exception as e:  # noqa: BLE001 - not saving the trace only costs the next start its trace
        logger.info("the traced graph cannot be saved for a warm start (%s: %s)", type(e).__name__, e)
        return None


class WeakBackend:
    """What ``torch.compile`` is given. Dynamo keeps every backend it has seen in a process-wide
    dict (``torch._dynamo.eval_frame.cached_backends``) for ever; reached through it, a model's
    compiled pieces, static graphs and their memory pool would outlive the model. The real backend
    lives as long as the model that owns it."""

    def __init__(self, backend: Callable) -> None:
        self._backend = weakref.ref(backend)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        backend = self._backend()
        if backend is None:
            raise RuntimeError("the model that owned this compiled forward is gone")
        return backend(gm, example_inputs)


class DirectCall:
    """``plan(module, *args, **kwargs)`` -> output of the compiled graph, with no Dynamo frame."""

    def __init__(self, signature: inspect.Signature, compiled: Callable, input_sources: list[str | None],
                 module: torch.nn.Module, single_output: bool, none_args: list[str]) -> None:
        params = list(signature.parameters.values())
        self.self_name = params[0].name
        self.arg_names = [p.name for p in params[1:]]
        self.defaults = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
        self.compiled = compiled
        self._extract = self._build_extractor(input_sources, module)
        self.single_output = single_output
        # Arguments that were None when traced are not graph inputs: a tensor there later would be
        # silently ignored, so it is refused instead.
        self.none_args = none_args

    def _build_extractor(self, sources: list[str | None], module: torch.nn.Module) -> Callable:
        if any(s is None for s in sources):
            raise ValueError("a graph input has no source")
        constants: list[Any] = []
        items = []
        scope = {"L": {self.self_name: module}}
        for source in sources:
            if source.startswith(f"L[{self.self_name!r}]"):
                constants.append(eval(source, scope))  # resolved once: module state, not call state
                items.append(f"C[{len(constants) - 1}]")
            elif source.startswith("L["):
                items.append(source)
            else:
                raise ValueError(f"graph input {source} is neither an argument nor module state")
        code = f"lambda L, C: ({', '.join(items)},)"
        extract = eval(code, {})
        return lambda L: extract(L, constants)

    def graph_inputs(self, module: torch.nn.Module, kwargs: dict[str, Any]) -> tuple:
        """The compiled graph's arguments for a call bound to ``kwargs`` (names -> values)."""
        local = dict(self.defaults)
        local.update(kwargs)
        local[self.self_name] = module
        return self._extract(local)

    def __call__(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        local = dict(self.defaults)
        local.update(zip(self.arg_names, args))
        local.update(kwargs)
        local[self.self_name] = module
        for name in self.none_args:
            if local.get(name) is not None:
                raise TypeError(f"argument {name!r} was None when the model was traced; the compiled graph "
                                f"cannot take it now (construct the model again to trace with it)")
        out = self.compiled(*self._extract(local))
        return out[0] if self.single_output else tuple(out)


def _output_layout(graph_out: Any, result: Any) -> bool:
    """True when the forward returns the graph's only output, False when it returns the tuple."""
    if isinstance(graph_out, (tuple, list)) and len(graph_out) == 1 and result is graph_out[0]:
        return True
    if isinstance(result, tuple) and isinstance(graph_out, (tuple, list)) and len(result) == len(graph_out) \
            and all(a is b for a, b in zip(result, graph_out)):
        return False
    raise ValueError("the forward's return value is not the graph's output as is")


def bound_arguments(signature: inspect.Signature, module: torch.nn.Module, args: tuple,
                    kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, ``self`` left out, defaults not filled in."""
    bound = signature.bind(module, *args, **kwargs).arguments
    self_name = next(iter(signature.parameters))
    return {k: v for k, v in bound.items() if k != self_name}


def _first_call_plan(signature: inspect.Signature, first: FirstCall, module: torch.nn.Module,
                     bound: dict[str, Any], result: Any) -> DirectCall:
    if first.args is None:
        raise ValueError("the compiled graph was not called on the first call")
    defaults = {p.name: p.default for p in signature.parameters.values() if p.default is not inspect.Parameter.empty}
    none_args = [n for n in list(signature.parameters)[1:] if bound.get(n, defaults.get(n)) is None]
    plan = DirectCall(signature, first.compiled, first.input_sources, module, _output_layout(first.output, result),
                      none_args)
    replayed = plan.graph_inputs(module, bound)
    recorded = first.args
    same = len(replayed) == len(recorded) and all(
        a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(replayed, recorded))
    if not same:
        raise ValueError("the recorded argument layout does not reproduce Dynamo's arguments")
    return plan


def plan_direct_call(signature: inspect.Signature, first: FirstCall, module: torch.nn.Module,
                     args: tuple, kwargs: dict[str, Any], result: Any, tag: str) -> DirectCall | None:
    """The direct-call plan for this model, or None (logged) when Dynamo's path must stay."""
    try:
        return _first_call_plan(signature, first, module, bound_arguments(signature, module, args, kwargs), result)
    except Exception as e:  # any surprise in Dynamo's metadata: keep the always-correct path
        logger.info("%s: calling through Dynamo on every step (%s)", tag, e)
        return None
