"""Base of the fusion passes: traced search/replacement functions on inductor's pattern matcher.

A fusion pass writes its search pattern as the model code it matches and its replacement as a
call of a ``graphmode::`` op; ``PatternPass.register`` traces both with make_fx at ATen level with
no decompositions (like the compiler's graphs), once per example dtype.

Matching happens on canonical graphs: patterns are traced, and target graphs cleaned, without
no-op views (make_fx records ``cos[:, None, :]`` as a full ``slice`` when sizes are symbolic but
not when they are static, and a view of a [T, H, D] tensor to its own shape). Each pattern pass
therefore runs ``eliminate_noops`` before matching, so it works in any pass order.

Shapes, dtypes and scalar literals are ignored in the first match; the matcher then retraces the
pattern with the matched values and requires an exact match, so shape-dependent details (split
sizes, head_dim, the dims of a mean, the cast dtypes) are checked, not assumed.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Iterable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._inductor.pattern_matcher import (
    Match, PatternMatcherPass, fwd_only, register_replacement, stable_topological_sort,
)

from passes.base import GraphPass
from passes.noop_elimination import eliminate_noops

logger = logging.getLogger(__name__)

# Each dtype gives the structural variant its casts produce (fp32: none; half types: _to_copy).
PATTERN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _no_decompositions() -> dict:
    return {}


def trace_pattern(fn: Callable, args: Sequence[Any], **_: Any) -> torch.fx.GraphModule:
    """make_fx at ATen level in canonical form (the same ``eliminate_noops`` as target graphs).

    Traced on fake tensors even for the first, real-valued examples: no-ops are recognised from
    the nodes' fake values, which a real-tensor trace does not record.
    """
    fake_mode = torch._guards.detect_fake_mode(args)
    if fake_mode is None:
        fake_mode = FakeTensorMode()
        args = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with fake_mode:
        gm = fwd_only(fn, args, run_functional_passes=False, get_decomp_fn=_no_decompositions)
    eliminate_noops(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _always(match: Match) -> bool:
    return True


def _distinct_outputs(extra_check: Callable[[Match], bool]) -> Callable[[Match], bool]:
    # Outputs with the same structure (the q and k rotations) can all match one branch of the
    # graph; that match would feed q into k's slot.
    def check(match: Match) -> bool:
        outputs = [n for n in match.output_nodes() if n is not None]
        return len(set(outputs)) == len(outputs) and extra_check(match)

    return check


# torch >= 2.12 lets the replacement be traced without decompositions; 2.11 has no such argument
# (and needs none: the replacements are single custom-op calls, which do not decompose).
_REGISTER_KWARGS = ({"get_decomp_fn": _no_decompositions}
                    if "get_decomp_fn" in inspect.signature(register_replacement).parameters else {})


class PatternPass(GraphPass):
    """A GraphPass whose rewrites are registered patterns; subclasses implement ``register_patterns``."""

    def __init__(self) -> None:
        self._patterns = PatternMatcherPass(pass_name=self.name)
        self._functions: list[Callable] = []
        self.register_patterns()

    def register_patterns(self) -> None:
        raise NotImplementedError

    def register(self, search_fn: Callable, replace_fn: Callable, example_inputs: Iterable[Sequence[Any]],
                 extra_check: Callable[[Match], bool] = _always, scalars: dict[str, float] | None = None) -> None:
        """Register ``search_fn -> replace_fn`` traced at each of ``example_inputs`` (one per dtype).

        ``scalars`` names float arguments (eps) with a trace value; they are matched as arguments,
        not literals. Other scalars are fixed by the code of ``search_fn``.
        """
        self._functions += [search_fn, replace_fn, extra_check]
        for inputs in example_inputs:
            register_replacement(
                search_fn, replace_fn, list(inputs), trace_pattern, self._patterns,
                extra_check=_distinct_outputs(extra_check), scalar_workaround=dict(scalars or {}),
                skip_duplicates=True, **_REGISTER_KWARGS,
            )

    def source_objects(self) -> list[Any]:
        # Whole modules: patterns call helpers (and helpers of other passes) that a list of
        # functions would miss.
        modules = {inspect.getmodule(obj) for obj in [PatternPass, eliminate_noops, type(self), *self._functions]}
        return sorted(modules - {None}, key=lambda m: m.__name__)

    def __call__(self, graph: torch.fx.Graph) -> int:
        if not isinstance(graph.owning_module, torch.fx.GraphModule):
            raise TypeError(f"pass {self.name!r} needs a graph owned by a GraphModule")
        # Dead nodes (a stray ``detach``) are users too, and users outside a pattern block a match.
        graph.eliminate_dead_code()
        eliminate_noops(graph)
        count = self._patterns.apply(graph)
        if count:
            # Replacements are inserted at the first matched output; constants read further down
            # (get_attr nodes placed late by make_fx) must move up before them.
            stable_topological_sort(graph)
            graph.eliminate_dead_code()
        logger.debug("%s: %d match(es)", self.name, count)
        return count


def users_outside(match: Match, node: torch.fx.Node) -> bool:
    """Whether ``node`` is also used by nodes that the match does not replace."""
    inside = set(match.nodes)
    return any(user not in inside for user in node.users)
