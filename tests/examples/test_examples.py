"""Every script in examples/ runs as a user would run it (a fresh process, from the repository root)
and prints what it promises; the README names each one."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.serve import running_server

EXAMPLES = REPO_ROOT / "examples"
TIMEOUT_S = 600  # loading SmolLM2 takes ~30 s on the 2-core CI machine; generous for a busy one

# script -> what its output must contain
EXPECTED = {
    "offline_generation.py": ["'The capital of France is' -> ' Paris", "sample 0:", "sample 1:"],
    "chat.py": ["assistant: The capital of France is Paris", "Rome"],
    "compile_your_model.py": ["Dynamo traces: 1;", "'fuse_rms_norm': 1", "'fuse_silu_mul': 1", "== tag decoder =="],
    "vision_request.py": ["prompt tokens (the image placeholder", "generated token ids: ["],
    "openai_client.py": ["Paris"],
}


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_example_has_a_test_and_a_line_in_the_readme():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(EXPECTED)
    readme = (REPO_ROOT / "README.md").read_text()
    assert [s for s in scripts if f"examples/{s}" not in readme] == []


@pytest.mark.parametrize("script", sorted(s for s in EXPECTED if s != "openai_client.py"))
def test_offline_example(script):
    out = _run(script)
    for expected in EXPECTED[script]:
        assert expected in out, f"{script} printed:\n{out}"


def test_openai_client_example_streams_from_the_server():
    with running_server() as base_url:
        out = _run("openai_client.py", f"{base_url}/v1")
    for expected in EXPECTED["openai_client.py"]:
        assert expected in out, f"openai_client.py printed:\n{out}"
