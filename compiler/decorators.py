"""``@support_torch_compile``: make a plain-PyTorch module class compile itself on first call.

The config comes from the constructor keyword ``compilation_config=``, else the enclosing
``compiler.use_config(...)`` block, else ``CompilationConfig()``. The first call marks the dynamic
dims (dim 0 of every tensor argument unless ``dynamic_arg_dims`` says otherwise) and traces once;
Dynamo's guards are then dropped so every later token count runs the same compiled code with no
re-trace, and later calls go straight to the compiled graph (``compiler/direct_call.py``).
``debug=True`` keeps the guards and turns a would-be recompile into a clear error.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import sys
import time
import types
from typing import Any, Callable, TypeVar

import torch
import torch.fx.experimental._config as fx_config

from compiler.backend import GraphModeBackend
from compiler.compiler_interface import CompilerInterface, make_compiler
from compiler.config import CompilationConfig, current_config
from compiler.counters import counters
from compiler.direct_call import DirectCall, RecordingBackend, WeakBackend, bound_arguments, plan_direct_call
from compiler.trace_cache import InputSpec, TraceCache, TracedGraph, load_graph
from runtime.platforms import current_platform

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=type)


class RecompileError(RuntimeError):
    pass


def _source_hash(cls: type) -> str:
    """Hash of the module file that defines ``cls`` (a model edit must invalidate the cache)."""
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        source = cls.__qualname__
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _fresh_function(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object: Dynamo caches per code object, and each model
    instance must keep its own compiled graph (two instances may use different configs)."""
    code = fn.__code__.replace(co_name=fn.__code__.co_name)
    assert code is not fn.__code__
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledForward:
    """Per-instance compiled forward: traces on first call, then calls the compiled code directly."""

    def __init__(self, module: torch.nn.Module, forward: Callable, config: CompilationConfig,
                 dynamic_arg_dims: dict[str, int | list[int]] | None, tag: str) -> None:
        self.config, self.tag = config, tag
        self.signature = inspect.signature(forward)
        self.dynamic_arg_dims = dynamic_arg_dims
        compiler = make_compiler(config.resolved_backend(current_platform.default_compile_backend))
        self.backend = GraphModeBackend(config, tag, compiler, _source_hash(type(module)), current_platform.name,
                                        _pass_manager(config, compiler))
        # A warm start skips Dynamo where the compile cache is on (not in debug: guards must be checked).
        self.traces = None
        if self.backend.cache_directory is not None and not config.debug:
            try:
                self.traces = TraceCache(self.backend.cache_directory)
            except OSError as e:
                logger.warning("%s: traced graphs cannot be cached (%s)", tag, e)
        self.recorder = RecordingBackend(self.backend, record_trace=self.traces is not None)
        # Without debug every guard goes: one trace serves every token count. With debug the shape
        # guards still go (they would pin 0/1 sizes), the rest stay so a real change is caught.
        keep = (lambda guards: [g.guard_type != "SHAPE_ENV" for g in guards]) if config.debug else \
            (lambda guards: [False] * len(guards))
        options = {"guard_filter_fn": keep}
        self.compiled = torch.compile(_fresh_function(forward), backend=WeakBackend(self.recorder), fullgraph=True,
                                      dynamic=False, options=options)
        self.traced = False
        self.direct: DirectCall | None = None  # after the first trace (not in debug: guards stay on)

    def _mark_dynamic(self, bound: inspect.BoundArguments) -> None:
        for name, value in bound.arguments.items():
            if not isinstance(value, torch.Tensor):
                continue
            if self.dynamic_arg_dims is None:
                dims = [0]
            elif name in self.dynamic_arg_dims:
                spec = self.dynamic_arg_dims[name]
                dims = [spec] if isinstance(spec, int) else list(spec)
            else:
                continue
            for dim in dims:
                torch._dynamo.mark_dynamic(value, dim % value.dim())

    def __call__(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.traced:
            return self._first_call(module, args, kwargs)
        if self.direct is not None:
            return self.direct(module, *args, **kwargs)
        if self.config.debug:
            try:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    return self.compiled(module, *args, **kwargs)
            except torch._dynamo.exc.RecompileError as e:
                raise RecompileError(
                    f"{self.tag}: these inputs need a new trace (the compiled graph assumes the first call's "
                    f"argument structure and dtypes): {str(e).splitlines()[0]}") from None
        return self.compiled(module, *args, **kwargs)

    def _first_call(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        bound = bound_arguments(self.signature, module, args, kwargs)
        key = TraceCache.key(module, bound, self.tag) if self.traces is not None else None
        entry = self.traces.load(key) if key is not None else None
        if entry is not None and self._plan_from_saved_trace(entry, module, bound):
            self.traced = True
            return self.direct(module, *args, **kwargs)
        self._mark_dynamic(self.signature.bind(module, *args, **kwargs))
        # Size-oblivious reasoning keeps a first call with 1 token from specialising the graph to 1.
        self.backend.trace_started = time.perf_counter()
        with fx_config.patch(backed_size_oblivious=True):
            out = self.compiled(module, *args, **kwargs)
        self.traced = True
        if not self.config.debug:
            self.direct = plan_direct_call(self.signature, self.recorder.first, module, args, kwargs, out, self.tag)
        trace = self.recorder.first.trace
        if key is not None and self.direct is not None and trace is not None:
            trace.single_output, trace.none_args = self.direct.single_output, self.direct.none_args
            self.traces.save(key, trace)
        # Dynamo's code cache outlives the model and reaches the recorder: keep no tensors there.
        self.recorder.first.args = self.recorder.first.output = self.recorder.first.trace = None
        return out

    def _plan_from_saved_trace(self, entry: TracedGraph, module: torch.nn.Module, bound: dict[str, Any]) -> bool:
        """Build the forward from a saved trace (no Dynamo); False (logged) if it does not fit this call."""
        self.backend.trace_started = time.perf_counter()
        try:
            gm, inputs, mode = load_graph(entry)
            with fx_config.patch(backed_size_oblivious=True), torch._guards.tracing(torch._guards.TracingContext(mode)):
                compiled = self.backend.build(gm, inputs)
            direct = DirectCall(self.signature, compiled, [s.source for s in entry.inputs], module,
                                entry.single_output, entry.none_args)
            _check_inputs(direct.graph_inputs(module, bound), entry.inputs)
        except Exception as e:  # noqa: BLE001 - a saved trace that does not fit costs one Dynamo trace
            logger.warning("%s: the saved trace does not fit this model (%s: %s); tracing with Dynamo", self.tag,
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return False
        self.direct = direct
        counters.traces_loaded += 1
        logger.info("%s: loaded the traced graph (no Dynamo trace) in %.2f s", self.tag,
                    self.backend.timings.get("trace_s", 0.0))
        return True


def _check_inputs(values: tuple, specs: list[InputSpec]) -> None:
    """The call's graph inputs are what the saved trace was made for: kinds, dtypes, ranks, static sizes."""
    if len(values) != len(specs):
        raise ValueError(f"{len(values)} graph inputs where the trace had {len(specs)}")
    for value, input_spec in zip(values, specs):
        spec = input_spec.value
        if spec.kind == "symint":
            ok = isinstance(value, int)
        else:
            ok = isinstance(value, torch.Tensor) and str(value.dtype) == f"torch.{spec.dtype}" and \
                value.dim() == len(spec.shape) and value.device.type == torch.device(spec.device).type and \
                all(not d.isdigit() or int(d) == n for d, n in zip(spec.shape, value.shape))
        if not ok:
            raise ValueError(f"graph input {input_spec.source} does not match the saved trace")


def compile_timings(root: torch.nn.Module) -> dict[str, float]:
    """Seconds ``root``'s compiled modules spent in Dynamo's trace, the passes and compiling, summed over them."""
    totals = {"trace_s": 0.0, "passes_s": 0.0, "compile_s": 0.0}
    for module in root.modules():
        compiled = getattr(module, "_compiled_forward", None)
        if compiled is not None:
            for name in totals:
                totals[name] += compiled.backend.timings.get(name, 0.0)
    return totals


def record_capture(root: torch.nn.Module, capture: dict[str, Any], tag: str = "decoder") -> None:
    """Hand what the runtime captured for ``root``'s compiled modules of ``tag`` to their dumps."""
    for module in root.modules():
        compiled = getattr(module, "_compiled_forward", None)
        if compiled is not None and compiled.tag == tag:
            compiled.backend.record_capture(capture)


def _pass_manager(config: CompilationConfig, compiler: CompilerInterface) -> Any | None:
    """The pass pipeline for ``config`` ("default" depends on the compiler); None when it names no passes."""
    if not config.passes:
        return None
    from passes.manager import PassManager  # imports torch._inductor: only when passes run

    return PassManager.from_names(config.passes, record=config.dump_dir is not None,
                                  backend_fuses=compiler.fuses_elementwise)


def support_torch_compile(cls: T | None = None, *, dynamic_arg_dims: dict[str, int | list[int]] | None = None,
                          enable_if: Callable[[CompilationConfig], bool] | None = None, tag: str = "decoder"):
    """Class decorator; use bare or with ``dynamic_arg_dims`` / ``enable_if`` / ``tag``."""

    def wrap(klass: T) -> T:
        original_init, original_forward = klass.__init__, klass.forward

        def __init__(self, *args: Any, compilation_config: CompilationConfig | None = None, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            config = compilation_config or current_config() or CompilationConfig()
            enabled = config.mode == "compile" and (enable_if is None or enable_if(config))
            # Stored outside nn.Module's attribute machinery: it is not a submodule.
            object.__setattr__(self, "_compiled_forward",
                               CompiledForward(self, original_forward, config, dynamic_arg_dims, tag)
                               if enabled else None)
            object.__setattr__(self, "compilation_config", config)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            compiled = self._compiled_forward
            if compiled is None or torch.compiler.is_compiling():
                return original_forward(self, *args, **kwargs)
            return compiled(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(original_forward)  # type: ignore[attr-defined]
        klass.__init__ = __init__
        klass.forward = forward
        klass.original_forward = original_forward
        return klass

    return wrap(cls) if cls is not None else wrap
