"""The inspection CLI on real SmolLM2 dumps (compile mode, piecewise, CPU), passes on and off."""
import json
import subprocess
import sys

import pytest

from compiler import CompilationConfig
from models.loader import load_model
from tests.helpers.paged import PagedDriver
from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)


def _cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "compiler.inspect", *args, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def dumps(smollm2_path, tmp_path_factory):
    out = {}
    for name, passes in (("passes", ["default"]), ("nopasses", [])):
        root = tmp_path_factory.mktemp(name)
        loaded = load_model(smollm2_path, dtype="float32", device="cpu", compilation_config=CompilationConfig(
            mode="compile", backend="eager", graph_mode="piecewise", passes=passes, dump_dir=str(root)))
        PagedDriver(loaded.model, max_len=32, num_seqs=1).generate_greedy([[1, 2, 3, 4]], max_new_tokens=2)
        out[name] = (str(root), loaded)
    return out


def test_summary_and_ops_match_the_run(dumps):
    root, loaded = dumps["passes"]
    backend = loaded.model.model._compiled_forward.backend
    layers = loaded.config.num_hidden_layers
    summary = _cli(root, "summary")
    tag = next(t for t in summary["tags"] if t["tag"] == "decoder")
    assert tag["config"]["graph_mode"] == "piecewise"
    assert tag["totals"]["pieces"] == 2 * layers + 1 and tag["totals"]["splitting_pieces"] == layers
    assert tag["pass_matches"]["fuse_silu_mul"] == layers and tag["pass_matches"]["fuse_add_rms_norm"] == 2 * layers - 1
    piece = backend.pieces[2]
    ops = _cli(root, "ops", "decoder", "--piece", str(piece.index))
    assert ops["op_counts"] == piece.op_counts()


def test_compare_reports_the_op_drop_from_passes(dumps):
    facts = _cli("compare", dumps["nopasses"][0], dumps["passes"][0])
    tag = next(t for t in facts["tags"] if t["tag"] == "decoder")
    assert tag["compiled_ops"]["b"] < tag["compiled_ops"]["a"]
    assert tag["compiled_op_deltas"]["graphmode::silu_and_mul"]["delta"] == dumps["passes"][1].config.num_hidden_layers
    rsqrt = {op: v for op, v in tag["compiled_op_deltas"].items() if "rsqrt" in op}
    assert rsqrt and all(v["b"] == 0 and v["a"] > 0 for v in rsqrt.values())  # every norm was fused
