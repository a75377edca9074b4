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
    assert tag["ops_after_passes"]["b"] < tag["ops_after_passes"]["a"]
    assert tag["compiled_op_deltas"]["graphmode::silu_and_mul"]["delta"] == dumps["passes"][1].config.num_hidden_layers
    rsqrt = {op: v for op, v in tag["compiled_op_deltas"].items() if "rsqrt" in op}
    assert rsqrt and all(v["b"] == 0 and v["a"] > 0 for v in rsqrt.values())  # every norm was fused


def test_summary_and_compare_count_the_same_compiled_ops(dumps):
    root, _ = dumps["passes"]
    tag = next(t for t in _cli(root, "summary")["tags"] if t["tag"] == "decoder")
    same = next(t for t in _cli("compare", root, root)["tags"] if t["tag"] == "decoder")
    assert tag["totals"]["ops_after_passes"] == same["ops_after_passes"]["a"] == same["ops_after_passes"]["b"]
    assert tag["totals"]["ops_after_passes"] < tag["totals"]["ops_compiled"]  # the passes fused ops away
    assert tag["timings_s"]["trace_s"] > 0  # Dynamo's trace, timed


def test_diff_reports_per_piece_and_takes_the_default_pass_set(dumps):
    root, loaded = dumps["passes"]
    layers = loaded.config.num_hidden_layers
    silu = _cli(root, "diff", "decoder", "fuse_silu_mul")
    # One SiLU-and-mul per layer, each in its own piece (node names repeat across pieces).
    assert silu["op_delta"]["graphmode::silu_and_mul"] == layers
    touched = [g for g in silu["per_graph"] if g["added"]]
    assert len(touched) == layers and len(silu["per_graph"]) == layers + 1
    everything = _cli(root, "diff", "decoder", "default")
    assert everything["pass"] == "default" and everything["before"]["file"] == "aten.py"
    assert everything["op_delta"]["graphmode::silu_and_mul"] == layers
    assert everything["matches"] == sum(m for m in _cli(root, "summary")["tags"][0]["pass_matches"].values())
