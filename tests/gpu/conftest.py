"""GPU tests: skipped (with a reason) on machines without CUDA unless TRITON_INTERPRET=1.

The ``gpu`` marker is registered in pyproject.toml. The repository root goes on sys.path so
``pytest tests/gpu`` works without ``python -m``.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
