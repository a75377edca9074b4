"""Our loggers print by default in a user's script, once, and get out of the way of an application that
configures logging itself (runtime/logger.py)."""
import os
import subprocess
import sys

from tests.helpers import REPO_ROOT

SAY = "import logging, runtime; logging.getLogger('runtime.engine.core').info('hello from the engine')"
APP_CONFIGURES_FIRST = ("import logging; logging.basicConfig(format='app: %(message)s'); import runtime; "
                        "logging.getLogger('runtime.engine.core').info('hello from the engine')")


def _stderr(code: str, **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHMODE_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**full_env, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_a_script_sees_info_lines_without_configuring_logging():
    err = _stderr(SAY)
    assert err.count("hello from the engine") == 1 and "INFO" in err


def test_an_application_that_configures_logging_gets_each_line_once():
    err = _stderr(APP_CONFIGURES_FIRST)
    assert err.splitlines().count("app: hello from the engine") == 1
    assert err.count("hello from the engine") == 1


def test_switched_off_and_level_by_environment():
    assert "hello" not in _stderr(SAY, GRAPHMODE_CONFIGURE_LOGGING="0")
    assert "hello" not in _stderr(SAY, GRAPHMODE_LOGGING_LEVEL="warning")


def test_a_bad_level_is_named():
    proc = subprocess.run([sys.executable, "-c", "import runtime"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "GRAPHMODE_LOGGING_LEVEL": "loud"})
    assert proc.returncode != 0 and "GRAPHMODE_LOGGING_LEVEL='LOUD' is not a logging level" in proc.stderr
