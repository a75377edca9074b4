"""Dual-batch overlap (DBO): the seam every collective goes through.

Communication ops (tensor-parallel all-reduce, MoE dispatch/combine) never call a collective's
``wait`` themselves; they hand a ``launch`` callable to :func:`run_collective`. Outside a DBO step
that launches and waits at once. Inside one, the micro-batch thread yields to its sibling between
launch and wait, so the sibling's compute overlaps this micro-batch's communication.
"""
from __future__ import annotations

from typing import Any, Callable


def run_collective(label: str, launch: Callable[[], Any]) -> None:
    """Run one collective. ``launch`` starts it and returns a handle with ``wait()`` (or None when
    the collective already completed synchronously); ``label`` names the yield point for tracing."""
    handle = launch()
    if handle is not None:
        handle.wait()
