"""``counters``: what the compiler did, counted by the real events (tests and dumps read them)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass
class CompilerCounters:
    dynamo_traces: int = 0
    traces_loaded: int = 0  # forwards that ran from a saved trace instead of Dynamo (compiler/trace_cache.py)
    backend_compilations: int = 0  # pieces (or whole graphs) handed to a compile backend
    piecewise_graphs: int = 0  # compiled pieces produced by splitting
    graphs_captured: int = 0  # static device graphs captured
    graph_replays: int = 0
    eager_fallbacks: int = 0  # steps that ran without a static graph (size above the largest capture)
    cache_hits: int = 0
    cache_misses: int = 0
    pass_matches: Counter = field(default_factory=Counter)  # pass name -> rewritten matches
    traces_by_tag: Counter = field(default_factory=Counter)  # model tag ("decoder", "encoder") -> traces

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, Counter() if f.name in _COUNTER_FIELDS else 0)

    def snapshot(self) -> dict[str, object]:
        return {f.name: dict(getattr(self, f.name)) if f.name in _COUNTER_FIELDS else getattr(self, f.name)
                for f in fields(self)}


_COUNTER_FIELDS = ("pass_matches", "traces_by_tag")


counters = CompilerCounters()
