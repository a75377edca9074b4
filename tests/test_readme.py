"""Every Python block of the README runs verbatim, in a fresh process, and prints what the README implies."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.S | re.M)
TIMEOUT_S = 900  # the compile block runs Inductor's first C++ build on the 2-core CI machine

# What each block must print, by a line of its code (a block the README adds must be listed here).
EXPECTED = {
    "llm = LLM()  # the embedded SmolLM2": r"^ Paris",
    "write_tiny_qwen2_vl_checkpoint(tempfile.mkdtemp())": r"^\[(\d+, ){7}\d+\]$",
    '"backend": "inductor", "graph_mode": "full_and_piecewise"': r"^ Paris",
}


def _expected(block: str) -> str:
    matches = [pattern for marker, pattern in EXPECTED.items() if marker in block]
    assert len(matches) == 1, f"README block without an expectation in tests/test_readme.py:\n{block}"
    return matches[0]


def test_the_readme_has_the_blocks_this_test_knows():
    assert len(BLOCKS) == len(EXPECTED)
    for block in BLOCKS:
        _expected(block)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs_verbatim(block, smollm2_path):
    proc = subprocess.run([sys.executable, "-c", block], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"README block failed:\n{block}\n{proc.stderr[-3000:]}"
    assert re.search(_expected(block), proc.stdout, flags=re.M), f"printed:\n{proc.stdout}"
