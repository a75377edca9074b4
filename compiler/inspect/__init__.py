"""Inspection CLI for graphmode graph dumps: ``python -m compiler.inspect DUMP_DIR [command]``.

Reads only the dump directory written by ``CompilationConfig(dump_dir=...)`` (see compiler/dump.py);
never imports model code or executes the stored graph code. Commands: summary, ops, show, diff,
graph, compare; each with ``--json``. Modules: reader (loading/validating), analysis (ast +
networkx), render (text tables), picture (dot/svg/html), cli (argparse; ``__main__`` runs it).
"""
from compiler.inspect.cli import main
from compiler.inspect.reader import Dump, DumpError, Tag, load_dump

__all__ = ["DumpError", "Dump", "Tag", "load_dump", "main"]
