"""The dump inspection CLI (compiler/inspect) on real dumps of a tiny random Llama."""
import copy
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter

import pytest
import torch

from compiler import CompilationConfig, counters
from compiler.dump import GraphDump, graph_source
from compiler.inspect.cli import main
from compiler.inspect.picture import dot_binary
from compiler.split import node_target_name
from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)
HAS_DOT = dot_binary() is not None  # Graphviz (GRAPHMODE_DOT may point elsewhere, or at nothing)


@torch.library.custom_op("graphmode_test::silu_mul", mutates_args=())
def silu_mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x) * y


@silu_mul.register_fake
def _(x, y):
    return torch.empty_like(x)


def _fx_op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Op counts straight from a real FX graph (what the manifest and the parsed code must agree with)."""
    return dict(Counter(node_target_name(n) for n in gm.graph.nodes
                        if n.op in ("call_function", "call_method", "call_module")))


def _make_dump(ckpt: str, dump_dir: str, **config) -> dict:
    """Load the checkpoint with a dumping compile config, run a forward; return facts of the run."""
    from models.loader import load_model
    from tests.helpers.paged import PagedDriver

    captured = {}
    original = GraphDump.write_graph

    def keep_dynamo(self, name, gm, title):
        if name == "dynamo":
            captured["dynamo"] = copy.deepcopy(gm)
        return original(self, name, gm, title)

    counters.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GraphDump, "write_graph", keep_dynamo)
        loaded = load_model(ckpt, dtype="float32", device="cpu", compilation_config=CompilationConfig(
            mode="compile", backend="eager", dump_dir=dump_dir, **config))
        driver = PagedDriver(loaded.model, max_len=64, num_seqs=2)
        driver.generate_greedy([[3, 14, 15, 92, 65], [35, 89]], max_new_tokens=2)
    backend = loaded.model.model._compiled_forward.backend
    return {"dir": dump_dir, "layers": loaded.model.config.num_hidden_layers,
            "fx_counts": [_fx_op_counts(p.module) for p in backend.pieces],
            "flags": [p.is_splitting_op for p in backend.pieces], "dynamo": captured["dynamo"]}


def _write_pass_dump(base: dict, target: str) -> dict:
    """A copy of ``base`` with two real FX rewrites of its Dynamo graph recorded as passes."""
    shutil.copytree(base["dir"], target)
    gm = copy.deepcopy(base["dynamo"])
    tag_dir = os.path.join(target, "decoder")
    floats = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "float"]
    for node in floats:  # "drop_float": the values are float32 already
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.recompile()
    with open(os.path.join(tag_dir, "after_drop_float.py"), "w") as f:
        f.write(graph_source(gm, "decoder after drop_float"))
    fused = 0
    for node in list(gm.graph.nodes):  # "fuse_silu_mul": silu(a) * b -> graphmode_test::silu_mul(a, b)
        if node.op == "call_function" and node.target is torch.nn.functional.silu and len(node.users) == 1:
            mul = next(iter(node.users))
            other = mul.args[1] if mul.args[0] is node else mul.args[0]
            with gm.graph.inserting_before(mul):
                new = gm.graph.call_function(torch.ops.graphmode_test.silu_mul, (node.args[0], other))
            mul.replace_all_uses_with(new)
            gm.graph.erase_node(mul)
            gm.graph.erase_node(node)
            fused += 1
    gm.recompile()
    with open(os.path.join(tag_dir, "after_fuse_silu_mul.py"), "w") as f:
        f.write(graph_source(gm, "decoder after fuse_silu_mul"))
    manifest_path = os.path.join(tag_dir, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest.pop("passes_stage", None)  # these synthetic passes rewrite the graph before the split
    manifest["passes"] = [{"name": "drop_float", "matches": len(floats), "file": "after_drop_float.py"},
                          {"name": "fuse_silu_mul", "matches": fused, "file": "after_fuse_silu_mul.py"}]
    manifest["counters"]["pass_matches"] = {"drop_float": len(floats), "fuse_silu_mul": fused}
    manifest["capture"] = {"sizes": [1, 2, 4, 8], "graph_pool_bytes": 3 * 2 ** 20, "capture_s": 0.25,
                           "mode": "piecewise"}
    json.dump(manifest, open(manifest_path, "w"))
    return {"dir": target, "floats": len(floats), "fused": fused, "after": _fx_op_counts(gm)}


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    from models.testing import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("inspect")
    ckpt = write_tiny_checkpoint("LlamaForCausalLM", str(root / "llama"))
    split = _make_dump(ckpt, str(root / "split"))
    whole = _make_dump(ckpt, str(root / "whole"), splitting_ops=[])
    passes = _write_pass_dump(split, str(root / "passes"))
    return {"split": split, "whole": whole, "passes": passes, "root": root}


def _json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _cli(*argv, env=None):
    return subprocess.Popen([sys.executable, "-m", "compiler.inspect", *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))


def test_summary_matches_the_run(dumps, capsys):
    run = dumps["split"]
    facts = _json(capsys, run["dir"])
    (tag,) = facts["tags"]
    layers = run["layers"]
    assert tag["tag"] == "decoder" and facts["format_version"] == 1
    assert tag["config"]["mode"] == "compile" and tag["backend"] == "eager" and tag["cache"] == "off"
    assert tag["totals"]["pieces"] == 2 * layers + 1 == len(run["fx_counts"])
    assert [p["is_splitting_op"] for p in tag["pieces"]] == run["flags"] == [i % 2 == 1 for i in range(2 * layers + 1)]
    assert tag["totals"]["splitting_pieces"] == layers
    for piece, fx in zip(tag["pieces"], run["fx_counts"]):
        assert piece["op_counts"] == fx and piece["num_ops"] == sum(fx.values())
        assert piece["ast_matches_manifest"], piece["index"]  # parsed code agrees with the FX graph
        assert piece["longest_chain"] >= (1 if piece["is_splitting_op"] else 5)
    assert tag["totals"]["ops"] == sum(sum(fx.values()) for fx in run["fx_counts"])
    # The chain runs through every piece: longer than the pieces' own chains added minus nothing lost.
    assert tag["longest_chain"] == sum(p["longest_chain"] for p in tag["pieces"])
    points = tag["splitting_points"]
    assert [p["piece"] for p in points] == [i for i in range(2 * layers + 1) if i % 2]
    for p in points:  # attention reads q, k, v, out; its result (out) feeds the next piece
        assert p["ops"] == ["graphmode::attention"] and p["fan_in"] == 4 and p["fan_out"] >= 1
        assert p["from_pieces"] == [p["piece"] - 1] and p["to_pieces"] == [p["piece"] + 1]
    from passes.manager import default_pass_names

    assert tag["capture"] is None and [p["name"] for p in tag["passes"]] == default_pass_names()
    assert tag["timings_s"]["compile_s"] > 0 and tag["counters"]["dynamo_traces"] == 1
    assert main([run["dir"]]) == 0
    text = capsys.readouterr().out
    assert "capture  none" in text and "SPLIT" in text and "graphmode::attention" in text


def test_summary_reads_passes_and_capture_when_present(dumps, capsys):
    tag = _json(capsys, dumps["passes"]["dir"], "summary")["tags"][0]
    assert tag["pass_matches"] == {"drop_float": dumps["passes"]["floats"], "fuse_silu_mul": dumps["passes"]["fused"]}
    assert tag["capture"]["sizes"] == [1, 2, 4, 8] and tag["timings_s"]["capture_s"] == 0.25
    main([dumps["passes"]["dir"]])
    assert "graph pool 3.0 MiB" in capsys.readouterr().out


def test_ops_of_a_piece_and_of_the_tag(dumps, capsys):
    run = dumps["split"]
    for index in (0, 1):
        facts = _json(capsys, run["dir"], "ops", "decoder", "--piece", str(index))
        assert facts["op_counts"] == run["fx_counts"][index] == facts["ast_op_counts"]
        assert facts["total"] == sum(run["fx_counts"][index].values())
    facts = _json(capsys, run["dir"], "ops", "decoder")
    attention = next(o for o in facts["ops"] if o["op"] == "graphmode::attention")
    assert attention == {"op": "graphmode::attention", "count": run["layers"], "namespace": "graphmode",
                         "custom": True, "splitting": True}
    assert facts["splitting_ops"] == ["graphmode::attention"] and "graphmode::attention" in facts["custom_ops"]
    assert not any(o["custom"] or o["splitting"] for o in facts["ops"] if o["op"] != "graphmode::attention")
    assert len(facts["per_piece"]) == 2 * run["layers"] + 1 and facts["ast_matches_manifest"]
    # A stage instead of the pieces: the fused graph holds the custom op, unmarked as splitting.
    fused = _json(capsys, dumps["passes"]["dir"], "ops", "decoder", "--stage", "after:fuse_silu_mul")
    assert fused["op_counts"] == dumps["passes"]["after"]
    assert "graphmode_test::silu_mul" in fused["custom_ops"]
    assert main([run["dir"], "ops", "decoder", "--piece", "1"]) == 0
    assert "SPLITTING" in capsys.readouterr().out


def test_show_prints_the_stored_code(dumps, capsys):
    d = dumps["passes"]["dir"]
    for stage, file_name in (("dynamo", "dynamo.py"), ("piece:1", "piece_1.py"),
                             ("after:drop_float", "after_drop_float.py")):
        facts = _json(capsys, d, "show", "decoder", "--stage", stage)
        assert facts["file"] == file_name
        assert facts["source"] == open(os.path.join(d, "decoder", file_name)).read()
    assert main([d, "show", "decoder", "--stage", "piece:1"]) == 0
    assert "torch.ops.graphmode.attention(" in capsys.readouterr().out


def test_diff_shows_what_each_pass_did(dumps, capsys):
    p = dumps["passes"]
    drop = _json(capsys, p["dir"], "diff", "decoder", "drop_float")
    assert drop["before"]["file"] == "dynamo.py" and drop["after"]["file"] == "after_drop_float.py"
    assert drop["matches"] == p["floats"] > 0
    assert drop["op_delta"] == {"Tensor.float": -p["floats"]}
    assert [r["op"] for r in drop["removed"]] == ["Tensor.float"] * p["floats"] and drop["added"] == []
    assert drop["changed"]  # the users of the dropped casts now read the cast's input
    fuse = _json(capsys, p["dir"], "diff", "decoder", "fuse_silu_mul")
    assert fuse["before"]["file"] == "after_drop_float.py" and fuse["matches"] == p["fused"] == dumps["split"]["layers"]
    assert fuse["op_delta"] == {"graphmode_test::silu_mul": p["fused"], "mul": -p["fused"], "silu": -p["fused"]}
    assert Counter(r["op"] for r in fuse["removed"]) == {"silu": p["fused"], "mul": p["fused"]}
    assert [a["op"] for a in fuse["added"]] == ["graphmode_test::silu_mul"] * p["fused"]
    assert fuse["ops_after"] == fuse["ops_before"] - p["fused"]
    assert main([p["dir"], "diff", "decoder", "fuse_silu_mul"]) == 0
    text = capsys.readouterr().out
    assert "torch.ops.graphmode_test.silu_mul(" in text and "- silu = torch.nn.functional.silu(" in text


def test_graph_dot_has_one_cluster_per_piece(dumps, capsys):
    run = dumps["split"]
    facts = _json(capsys, run["dir"], "graph", "decoder", "--format", "dot")
    dot = facts["content"]
    n = 2 * run["layers"] + 1
    assert dot.count("subgraph cluster_") == n and all(f"subgraph cluster_{i} {{" in dot for i in range(n))
    assert dot.count('peripheries="2"') == run["layers"]  # the splitting ops are marked
    assert facts["nodes"] == sum(sum(c.values()) for c in run["fx_counts"])
    assert [c["nodes"] for c in facts["clusters"]] == [sum(c.values()) for c in run["fx_counts"]]
    one = _json(capsys, run["dir"], "graph", "decoder", "--piece", "2")["content"]
    assert one.count("subgraph cluster_") == 1 and "subgraph cluster_2 {" in one


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz 'dot' is not installed (apt-get install graphviz)")
def test_graph_svg_parses_with_one_cluster_group_per_piece(dumps, tmp_path, capsys):
    run = dumps["split"]
    out = tmp_path / "g.svg"
    assert main([run["dir"], "graph", "decoder", "--format", "svg", "--output", str(out)]) == 0
    root = ET.parse(out).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    clusters = [g for g in root.iter(f"{ns}g") if g.get("class") == "cluster"]
    assert len(clusters) == 2 * run["layers"] + 1
    titles = sorted(g.find(f"{ns}title").text for g in clusters)
    assert titles == sorted(f"cluster_{i}" for i in range(2 * run["layers"] + 1))
    nodes = [g for g in root.iter(f"{ns}g") if g.get("class") == "node"]
    assert len(nodes) == sum(sum(c.values()) for c in run["fx_counts"])


def test_graph_svg_without_graphviz_says_how_to_install_it(dumps):
    proc = _cli(dumps["split"]["dir"], "graph", "decoder", "--format", "svg", env={"GRAPHMODE_DOT": "/nonexistent/dot"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "apt-get install graphviz" in err and "Traceback" not in err
    if not HAS_DOT:
        print("graphviz 'dot' missing here: the svg test was skipped, only this error path ran")


@pytest.mark.parametrize("engine", ["builtin", "auto"])
def test_graph_html_is_self_contained(dumps, tmp_path, capsys, monkeypatch, engine):
    run = dumps["split"]
    out = tmp_path / "g.html"
    facts = _json(capsys, run["dir"], "graph", "decoder", "--format", "html", "--engine", engine, "--output", str(out))
    page = out.read_text()
    assert facts["renderer"] == ("graphviz" if engine == "auto" and HAS_DOT else "builtin")
    assert "http://" not in page and "https://" not in page and " src=" not in page
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<script>" in page
    assert page.count('class="cluster"') == 2 * run["layers"] + 1
    if engine == "auto":  # without Graphviz, auto falls back to the builtin layout
        monkeypatch.setenv("GRAPHMODE_DOT", "/nonexistent/dot")
        facts = _json(capsys, run["dir"], "graph", "decoder", "--format", "html", "--output", str(out))
        assert facts["renderer"] == "builtin" and "https://" not in out.read_text()


def test_compare_reports_config_and_op_differences(dumps, capsys):
    split, whole = dumps["split"], dumps["whole"]
    facts = _json(capsys, "compare", split["dir"], whole["dir"])
    (tag,) = facts["tags"]
    assert tag["pieces"] == {"a": 2 * split["layers"] + 1, "b": 1}
    assert tag["splitting_pieces"] == {"a": split["layers"], "b": 0}
    assert tag["config_changes"] == {"splitting_ops": {"a": ["graphmode::attention"], "b": []}}
    assert tag["ops_a"] == sum(sum(c.values()) for c in split["fx_counts"])
    assert tag["ops_b"] == sum(sum(c.values()) for c in whole["fx_counts"])
    fx_a, fx_b = Counter(), Counter()
    for c in split["fx_counts"]:
        fx_a.update(c)
    for c in whole["fx_counts"]:
        fx_b.update(c)
    assert {op: v["delta"] for op, v in tag["op_deltas"].items()} == {
        op: fx_b[op] - fx_a[op] for op in set(fx_a) | set(fx_b) if fx_b[op] != fx_a[op]}
    assert "compile_s" in tag["timings_s"]
    # Attention writes its ``out`` in place; split or not, the dependency chain runs through it.
    assert tag["longest_chain"]["a"] == tag["longest_chain"]["b"]

    # A copy whose manifest lost three mul nodes of piece 0: the drop shows up as a delta.
    edited = str(dumps["root"] / "edited")
    shutil.copytree(split["dir"], edited)
    path = os.path.join(edited, "decoder", "manifest.json")
    manifest = json.load(open(path))
    manifest["pieces"][0]["op_counts"]["mul"] -= 3
    json.dump(manifest, open(path, "w"))
    tag = _json(capsys, split["dir"], "compare", edited)["tags"][0]
    assert tag["ops_b"] == tag["ops_a"] - 3 and list(tag["op_deltas"]) == ["mul"]
    assert tag["op_deltas"]["mul"]["delta"] == -3 and tag["config_changes"] == {}
    # Passes recorded in B only.
    tag = _json(capsys, split["dir"], "compare", dumps["passes"]["dir"])["tags"][0]
    assert tag["pass_matches"]["fuse_silu_mul"] == {"a": 2, "b": dumps["passes"]["fused"]}  # a: the real pass, 2 layers
    assert main(["compare", split["dir"], whole["dir"]]) == 0
    assert "splitting_ops" in capsys.readouterr().out


def test_wrong_inputs_print_one_line_and_fail(dumps, tmp_path):
    d = dumps["split"]["dir"]
    not_a_dump = tmp_path / "empty"
    (not_a_dump / "sub").mkdir(parents=True)
    (not_a_dump / "notes.txt").write_text("hi")
    future = tmp_path / "future"
    shutil.copytree(d, future)
    manifest = json.load(open(future / "decoder" / "manifest.json"))
    manifest["format_version"] = 99
    json.dump(manifest, open(future / "decoder" / "manifest.json", "w"))
    cases = {
        "no such directory": [str(tmp_path / "missing")],
        "not a graphmode dump": [str(not_a_dump)],
        "unknown tag 'encoder'": [d, "ops", "encoder"],
        "has no pass 'fuse_everything'": [d, "diff", "decoder", "fuse_everything"],
        "has no piece 42": [d, "ops", "decoder", "--piece", "42"],
        "unknown stage": [d, "show", "decoder", "--stage", "nowhere"],
        "format_version 99": [str(future), "summary"],
    }
    procs = {expected: _cli(*argv, "--json") for expected, argv in cases.items()}
    for expected, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, (expected, out)
        assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err, (expected, err)
        assert out == ""


def test_help_lists_the_commands():
    proc = _cli("--help")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    for command in ("summary", "ops TAG", "show TAG", "diff TAG PASS", "graph TAG", "compare"):
        assert command in out


def test_an_engine_run_records_its_capture_and_trace_time(tmp_path, capsys):
    """The engine hands what it captured to the dump; on the CPU that is nothing, and the summary says why."""
    from models.testing import write_tiny_checkpoint
    from runtime import LLM
    from runtime.platforms import current_platform

    if current_platform.supports_static_graphs:
        pytest.skip("checks the CPU dump: this platform captures graphs (tests/gpu checks those)")
    ckpt = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "llama"))
    dump_dir = str(tmp_path / "dump")
    LLM(ckpt, dtype="float32", max_num_seqs=2, max_model_len=64, num_kv_blocks=16,
        compilation_config={"mode": "compile", "backend": "eager", "graph_mode": "piecewise", "dump_dir": dump_dir})
    tag = _json(capsys, dump_dir, "summary")["tags"][0]
    assert tag["capture"] == {"mode": "none", "reason": "CPU: no static graphs on this platform"}
    assert tag["timings_s"]["trace_s"] > 0
    assert main([dump_dir]) == 0
    text = capsys.readouterr().out
    assert "capture  none (CPU: no static graphs on this platform)" in text and "trace=-" not in text


def test_summary_reports_the_graph_pool_by_kind_and_the_sizes_that_cost_most():
    from compiler.inspect.render import _pool_lines

    capture = {"graph_pool_by_size": [["piecewise", 512, 90.0], ["full", 256, 4.0], ["piecewise", 448, 2.0],
                                      ["piecewise", 1, 0.0]],
               "full_sizes": [1, 2, 4, 8], "graph_pool_estimate_bytes": 120 * 2**20}
    assert _pool_lines(capture) == [
        "  pool     piecewise 92.0 MiB, full 4.0 MiB (full sizes [1, 2, 4, 8]); most: piecewise 512 +90.0 MiB, "
        "full 256 +4.0 MiB, piecewise 448 +2.0 MiB; expected 120.0 MiB when the KV cache was sized"]
    assert _pool_lines({"mode": "full", "graph_pool_bytes": 0}) == []  # a dump written before these fields
