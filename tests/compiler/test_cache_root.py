"""Where the compile cache lives when a config names none: $GRAPHMODE_CACHE_ROOT, else ~/.cache/graphmode."""
import logging
import os

from compiler import CompilationConfig
from compiler.backend import GraphModeBackend
from compiler.compiler_interface import make_compiler
from compiler.config import CACHE_ROOT_ENV, resolve_cache_dir


def test_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(CACHE_ROOT_ENV, raising=False)
    assert resolve_cache_dir(None) == str(tmp_path / "home" / ".cache" / "graphmode")
    monkeypatch.setenv(CACHE_ROOT_ENV, str(tmp_path / "root"))
    assert resolve_cache_dir(None) == str(tmp_path / "root")
    assert resolve_cache_dir(str(tmp_path / "mine")) == str(tmp_path / "mine")  # the config's own wins
    assert resolve_cache_dir("") is None  # the config asks for no cache
    monkeypatch.setenv(CACHE_ROOT_ENV, "")
    assert resolve_cache_dir(None) is None  # the environment turns the default off


def _backend(config: CompilationConfig) -> GraphModeBackend:
    return GraphModeBackend(config, "decoder", make_compiler("inductor"), "model-hash", "cpu")


def test_inductor_caches_under_the_default_root_keyed_by_config(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ROOT_ENV, str(tmp_path / "root"))
    first = _backend(CompilationConfig(mode="compile", backend="inductor"))
    other = _backend(CompilationConfig(mode="compile", backend="inductor", compile_sizes=[4]))
    assert os.path.dirname(first.cache.directory) == str(tmp_path / "root")
    assert os.path.isdir(first.cache.directory) and first.cache.directory != other.cache.directory
    assert _backend(CompilationConfig(mode="compile", backend="inductor", cache_dir="")).cache is None


def test_a_root_that_cannot_be_written_compiles_without_a_cache(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(CACHE_ROOT_ENV, str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="compiler.backend"):
        backend = _backend(CompilationConfig(mode="compile", backend="inductor"))
    assert backend.cache is None
    assert "compile cache at" in caplog.text and "is unusable" in caplog.text
