"""Where the Triton tests run: CUDA by default, CPU through the Triton interpreter with TRITON_INTERPRET=1.

``GRAPHMODE_TEST_DEVICE`` overrides the device either way. Call ``select(__name__)`` at module level: it
skips the whole module (printing why) when neither is possible.
"""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def select(module_name: str) -> torch.device:
    device = torch.device(os.environ.get("GRAPHMODE_TEST_DEVICE") or ("cpu" if INTERPRET else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = "CUDA is not available (set TRITON_INTERPRET=1 to run these tests on CPU)"
        print(f"skipping {module_name}: {reason}")
        pytest.skip(reason, allow_module_level=True)
    if device.type != "cuda" and not INTERPRET:
        pytest.skip(f"device {device} needs TRITON_INTERPRET=1", allow_module_level=True)
    pytest.importorskip("triton")
    return device
