"""graphmode's loggers print by default, as vLLM's do: a user's script sees what the engine says
(the KV cache size, a graph mode that degrades) without configuring logging first.

Our packages' loggers get a handler at INFO on stderr. It stays silent once the application configures
the root logger itself (``logging.basicConfig``, a server's config, pytest's capture): records then reach
the application's handlers as usual, never printed twice. ``GRAPHMODE_CONFIGURE_LOGGING=0`` leaves logging
entirely to the application; ``GRAPHMODE_LOGGING_LEVEL`` sets the level (default INFO).
"""
from __future__ import annotations

import logging
import os
import sys

CONFIGURE_ENV = "GRAPHMODE_CONFIGURE_LOGGING"
LEVEL_ENV = "GRAPHMODE_LOGGING_LEVEL"
PACKAGES = ("runtime", "compiler", "models", "passes")
_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


class _DefaultHandler(logging.StreamHandler):
    """Prints only while nobody configured the root logger (then the root's handlers do)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def configure_default_logging() -> None:
    """Give our packages' loggers the default handler (once; a no-op when switched off)."""
    if os.environ.get(CONFIGURE_ENV, "1").strip() == "0":
        return
    level = os.environ.get(LEVEL_ENV, "INFO").strip().upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"{LEVEL_ENV}={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    handler = _DefaultHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    for name in PACKAGES:
        package_logger = logging.getLogger(name)
        if not any(isinstance(h, _DefaultHandler) for h in package_logger.handlers):
            package_logger.addHandler(handler)
        package_logger.setLevel(level)


def set_level(level: str | int) -> None:
    """The level of all our packages' loggers (command-line tools' ``--log-level``)."""
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level.upper() if isinstance(level, str) else level)
