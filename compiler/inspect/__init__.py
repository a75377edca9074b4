"""Inspection CLI for graphmode graph dumps: ``python -m compiler.inspect DUMP_DIR [command]``.

Reads only the dump directory written by ``CompilationConfig(dump_dir=...)`` (see compiler/dump.py);
never imports model code or executes the stored graph code. Commands: summary, ops, show, diff,
graph, compare; each with ``--json``. Modules: reader (loading/validating), analysis (ast +
networkx), render (text tables), picture (dot/svg/html), __main__ (argparse).
"""
from compiler.inspect.reader import DumpError, Dump, Tag, load_dump

__all__ = ["DumpError", "Dump", "Tag", "load_dump", "main"]


def main(argv=None) -> int:
    from compiler.inspect.__main__ import main as _main

    return _main(argv)
