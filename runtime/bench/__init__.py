"""Benchmarks: ``python -m runtime.bench latency|throughput|mm-encoder`` (runtime/bench/cli.py) and
``python -m runtime.bench.overhead`` (host cost of one forward's Python layers)."""
