"""The compile cache across processes: a warm start loads artefacts instead of compiling."""
import json
import os
import subprocess
import sys

import pytest

from models.testing import write_tiny_checkpoint
from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)

SCRIPT = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import torch
from compiler import CompilationConfig, counters
from models.loader import load_model
from tests.helpers.paged import PagedDriver
cfg = CompilationConfig.from_json(sys.argv[2])
# Inductor probes the CPU's vector ISA once per process by compiling test programs (~1 s here): that
# is process start-up, not compiling; done before the timed phase in both runs alike.
from torch._inductor.cpu_vec_isa import pick_vec_isa
pick_vec_isa()
loaded = load_model(sys.argv[1], dtype="float32", device="cpu", compilation_config=cfg)
driver = PagedDriver(loaded.model, max_len=64, num_seqs=2)
tokens, _ = driver.generate_greedy([[3, 14, 15, 92, 65], [35, 89]], max_new_tokens=6)
backend = loaded.model.model._compiled_forward.backend
print("RESULT " + json.dumps({"compile_s": backend.timings["compile_s"], "hits": counters.cache_hits,
                              "misses": counters.cache_misses, "tokens": tokens,
                              "traces": counters.dynamo_traces, "traces_loaded": counters.traces_loaded,
                              "cache_dir": backend.cache.directory}))
"""


def _run(ckpt, config: dict, env: dict) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ckpt, json.dumps(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stderr


@pytest.mark.slow
def test_warm_start_is_a_cache_hit_and_faster(tmp_path):
    ckpt = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "llama"))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PYTHONPATH=ROOT)
    config = {"mode": "compile", "backend": "inductor", "cache_dir": str(tmp_path / "cache")}
    cold, _ = _run(ckpt, config, env)
    warm, warm_log = _run(ckpt, config, env)
    assert cold["misses"] == 3 and cold["hits"] == 0, cold  # 2 layers -> 3 compiled pieces
    assert warm["hits"] == 3 and warm["misses"] == 0, (warm, warm_log[-2000:])
    assert "cache hit" in warm_log
    # The warm process ran no Dynamo trace: the saved graph gave the same pieces (every one a hit).
    assert (cold["traces"], cold["traces_loaded"]) == (1, 0) and (warm["traces"], warm["traces_loaded"]) == (0, 1)
    assert warm["tokens"] == cold["tokens"]
    assert cold["compile_s"] >= 5 * warm["compile_s"], (cold["compile_s"], warm["compile_s"])

    # Another config that changes generated code gets another key (a separate directory).
    other, _ = _run(ckpt, dict(config, compile_sizes=[4]), env)
    assert other["cache_dir"] != cold["cache_dir"] and other["misses"] > 0

    # A truncated entry is detected, logged, rebuilt; the model still runs correctly.
    entries = sorted(f for f in os.listdir(cold["cache_dir"]) if f.endswith(".bin"))
    victim = os.path.join(cold["cache_dir"], entries[0])
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 3)
    rebuilt, rebuilt_log = _run(ckpt, config, env)
    assert rebuilt["misses"] == 1 and rebuilt["hits"] == 2
    assert "unreadable" in rebuilt_log and rebuilt["tokens"] == cold["tokens"]
    again, _ = _run(ckpt, config, env)
    assert again["hits"] == 3  # the rebuilt entry was written back


@pytest.mark.slow
def test_identical_pieces_compile_once_per_process(tmp_path):
    """Four layers -> five pieces, of which the three middle ones (a layer's MLP and the next layer's
    attention inputs) have the same code and inputs: one compile serves them all."""
    ckpt = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "llama"), num_hidden_layers=4)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PYTHONPATH=ROOT)
    config = {"mode": "compile", "backend": "inductor", "cache_dir": str(tmp_path / "cache")}
    cold, _ = _run(ckpt, config, env)
    assert cold["misses"] == 3 and cold["hits"] == 2, cold
    assert len([f for f in os.listdir(cold["cache_dir"]) if f.endswith(".bin")]) == 3
    warm, _ = _run(ckpt, config, env)
    assert warm["misses"] == 0 and warm["hits"] == 5 and warm["tokens"] == cold["tokens"]


def test_entries_of_another_torch_version_are_never_read(monkeypatch, tmp_path):
    """The torch version is part of the global key: a process of another torch finds its own directory
    (a miss, compiled and written there), never an artefact it could misread."""
    import torch

    from compiler.cache import CompileCache

    key = CompileCache.make_global_key("cfg", "passes", "model", "a-platform")
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    other = CompileCache.make_global_key("cfg", "passes", "model", "a-platform")
    assert key != other
    assert CompileCache(str(tmp_path), key).directory != CompileCache(str(tmp_path), other).directory
