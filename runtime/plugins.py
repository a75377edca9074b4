"""Out-of-tree plugins through Python entry points, as vLLM's are (vllm-ascend registers its platform so).

- ``graphmode.platform_plugins``: a function taking nothing that returns the ``package.module:Class`` path of
  a ``runtime.platforms.Platform`` subclass when its device is usable here, else None. One that answers
  becomes the platform (``GRAPHMODE_PLATFORM`` still overrides; two that answer is an error naming both).
  It runs while ``runtime.platforms`` is being imported: its module imports nothing of ours at the top.
- ``graphmode.general_plugins``: a function taking nothing, called once per process before a model is
  resolved (in every worker process too): register a model architecture (``models.registry.register_model``),
  a custom op, anything.

A distribution declares them in its metadata, e.g. in pyproject.toml:
``[project.entry-points."graphmode.general_plugins"] my_models = "my_package.plugin:register"``.
``GRAPHMODE_PLUGINS=name1,name2`` loads only the plugins of those names.
"""
from __future__ import annotations

import functools
import logging
import os
from importlib.metadata import EntryPoint, entry_points
from typing import Any

logger = logging.getLogger(__name__)

PLATFORM_PLUGINS = "graphmode.platform_plugins"
GENERAL_PLUGINS = "graphmode.general_plugins"
ALLOWED_ENV = "GRAPHMODE_PLUGINS"


def _entry_points(group: str) -> list[EntryPoint]:
    allowed = {n.strip() for n in os.environ.get(ALLOWED_ENV, "").split(",") if n.strip()}
    return [ep for ep in entry_points(group=group) if not allowed or ep.name in allowed]


def _call(ep: EntryPoint) -> Any:
    return ep.load()()


def platform_plugin_specs() -> dict[str, str]:
    """Plugin name -> platform class path, for every platform plugin whose device is usable here."""
    specs = {}
    for ep in _entry_points(PLATFORM_PLUGINS):
        try:
            spec = _call(ep)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not stop the built-in platforms
            logger.warning("platform plugin %r (%s) failed and is skipped: %s: %s", ep.name, ep.value,
                           type(e).__name__, e)
            continue
        if spec is not None:
            specs[ep.name] = spec
    return specs


@functools.cache
def load_general_plugins() -> list[str]:
    """Runs every general plugin once in this process; the names run."""
    names = []
    for ep in _entry_points(GENERAL_PLUGINS):
        try:
            _call(ep)
        except Exception as e:
            raise RuntimeError(f"general plugin {ep.name!r} ({ep.value}) failed: {type(e).__name__}: {e}") from e
        names.append(ep.name)
        logger.info("general plugin %r loaded (%s)", ep.name, ep.value)
    return names
