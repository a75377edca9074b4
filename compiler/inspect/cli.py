"""``python -m compiler.inspect DUMP_DIR [command]`` (console script ``graphmode-inspect``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Any, Sequence

from compiler.inspect import analysis, picture, render
from compiler.inspect.reader import DumpError, Dump, Tag, load_dump

PROG = "graphmode-inspect"
COMMANDS = ("summary", "ops", "show", "diff", "graph", "compare")
DESCRIPTION = """Inspect a graphmode graph dump (the directory set as CompilationConfig(dump_dir=...)).
Reads only the dump: no model code is imported and no stored graph code is executed.

commands:
  summary (default)            per tag: config, timings, cache, pieces with op counts, splitting points
                               (fan-in/fan-out), longest dependency chain, passes, capture sizes, counters
  ops TAG [--piece N|--stage S] op histogram; custom ops and splitting ops marked
  show TAG --stage STAGE       the stored graph as Python; STAGE is dynamo, after:PASS or piece:N
  diff TAG PASS                what one pass did: nodes removed/added/rewired, op delta, match count
  graph TAG --format dot|svg|html [--output FILE]
                               the split graph as a picture, one cluster per piece (svg needs Graphviz)
  compare DIR_B                compare this dump (A) with another (B): op totals and per-op deltas,
                               pieces, timings, pass matches, config changes
                               (``graphmode-inspect compare DIR_A DIR_B`` works too)

Every command takes --json for machine-readable output with the same facts.
examples:
  graphmode-inspect /tmp/dump
  graphmode-inspect /tmp/dump ops decoder --piece 0
  graphmode-inspect /tmp/dump graph decoder --format html --output decoder.html
  graphmode-inspect compare /tmp/dump_passes_on /tmp/dump_passes_off --json"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    parser = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump_dir", help="the dump directory (or one <tag>/ directory in it)")
    parser.add_argument("--json", action="store_true", default=False, help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("summary", parents=[common], help="overview of every tag (default)")
    p = sub.add_parser("ops", parents=[common], help="op histogram of a tag, a piece or a stage")
    p.add_argument("tag")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--piece", type=int, help="only this piece")
    where.add_argument("--stage", help="a stored graph instead of the pieces: dynamo, after:PASS, piece:N")
    p = sub.add_parser("show", parents=[common], help="print a stored graph as Python")
    p.add_argument("tag")
    p.add_argument("--stage", default="dynamo", help="dynamo (default), after:PASS or piece:N")
    p = sub.add_parser("diff", parents=[common], help="what one pass changed")
    p.add_argument("tag")
    p.add_argument("pass_name", metavar="PASS")
    p = sub.add_parser("graph", parents=[common], help="draw the split graph (dot, svg, html)")
    p.add_argument("tag")
    p.add_argument("--format", choices=("dot", "svg", "html"), default="dot")
    p.add_argument("--output", "-o", help="write here instead of stdout")
    p.add_argument("--piece", type=int, help="only this piece")
    p.add_argument("--inputs", action="store_true", help="also draw graph inputs (weights, ids, ...)")
    p.add_argument("--engine", choices=("auto", "graphviz", "builtin"), default="auto",
                   help="html only: Graphviz layout (auto: when installed) or the builtin layered layout")
    p = sub.add_parser("compare", parents=[common], help="compare with another dump")
    p.add_argument("other", metavar="DIR_B")
    return parser


def _normalise_argv(argv: list[str]) -> list[str]:
    """Accept ``COMMAND DUMP_DIR ...`` (e.g. ``compare A B``) as well as ``DUMP_DIR COMMAND ...``."""
    positions = [i for i, a in enumerate(argv) if not a.startswith("-")]
    if len(positions) >= 2 and argv[positions[0]] in COMMANDS and not os.path.isdir(argv[positions[0]]):
        i, j = positions[0], positions[1]
        argv = list(argv)
        argv[i], argv[j] = argv[j], argv[i]
    return argv


# ---- facts (the JSON of each command; the text output renders these) ---------------------------
def tag_summary(tag: Tag) -> dict[str, Any]:
    tg = analysis.build_tag_graph(tag)
    pieces = analysis.piece_facts(tag, tg)
    compiled = [p for p in pieces if not p["is_splitting_op"]]
    split = [p for p in pieces if p["is_splitting_op"]]
    config = tag.config
    return {
        "tag": tag.name, "directory": tag.directory, "backend": tag.backend, "cache": tag.cache,
        "config": {k: config.get(k) for k in ("mode", "graph_mode", "backend", "splitting_ops", "passes",
                                              "capture_sizes", "compile_sizes")},
        "timings_s": tag.timings,
        "totals": {"pieces": len(pieces), "compiled_pieces": len(compiled), "splitting_pieces": len(split),
                   "ops": sum(p["num_ops"] for p in pieces), "ops_compiled": sum(p["num_ops"] for p in compiled),
                   "ops_splitting": sum(p["num_ops"] for p in split),
                   "ops_after_passes": sum(_compiled_ops(tag).values())},
        "longest_chain": analysis.longest_chain(tg.graph),
        "pieces": pieces,
        "splitting_points": analysis.splitting_points(tag, tg),
        "passes": [{"name": e.name, "matches": e.matches, "file": e.file} for e in tag.passes],
        "pass_matches": tag.pass_matches,
        "capture": tag.capture,
        "counters": tag.counters,
        "files": tag.manifest.get("files", {}),
    }


def summary_facts(dump: Dump) -> dict[str, Any]:
    versions = sorted({t.manifest.get("format_version") for t in dump.tags.values()})
    return {"dump": dump.path, "format_version": versions[0] if len(versions) == 1 else versions,
            "tags": [tag_summary(t) for t in dump.tags.values()]}


def ops_facts(tag: Tag, piece: int | None, stage: str | None) -> dict[str, Any]:
    flagged_ops = {op for p in tag.pieces if p.get("is_splitting_op") for op in p.get("op_counts", {}) if op != "getitem"}
    per_piece, chain = None, None
    if stage is not None:
        file_name, source = tag.read_stage(stage)
        codes = analysis.parse_source(source, file_name)
        counts, ast_counts = analysis.op_counts(codes), None
        chain = max((analysis.code_metrics(c)["longest_chain"] for c in codes), default=0)
    else:
        tg = analysis.build_tag_graph(tag)
        facts = analysis.piece_facts(tag, tg)
        if piece is not None:
            tag.piece(piece)  # unknown piece -> clear error
            facts = [f for f in facts if f["index"] == piece]
            chain = facts[0]["longest_chain"]
        else:
            chain = analysis.longest_chain(tg.graph)
            per_piece = [{k: f[k] for k in ("index", "is_splitting_op", "num_ops", "longest_chain", "op_counts")}
                         for f in facts]
        counts, ast_counts = Counter(), Counter()
        for f in facts:
            counts.update(f["op_counts"])
            ast_counts.update(tg.pieces[f["index"]].op_counts())
        counts, ast_counts = dict(counts), dict(ast_counts)
    ops = [{"op": op, "count": n, "namespace": analysis.namespace(op), "custom": analysis.is_custom_op(op),
            "splitting": tag.is_splitting_op(op) or op in flagged_ops}
           for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {"tag": tag.name, "piece": piece, "stage": stage, "source": "stored code" if stage else "manifest",
            "total": sum(counts.values()), "longest_chain": chain, "ops": ops, "op_counts": counts,
            "custom_ops": [o["op"] for o in ops if o["custom"]], "splitting_ops": [o["op"] for o in ops if o["splitting"]],
            "config_splitting_ops": tag.splitting_ops, "per_piece": per_piece, "ast_op_counts": ast_counts,
            "ast_matches_manifest": ast_counts is None or ast_counts == counts}


PASS_SETS = ("default", "all")  # ``diff TAG default``: what the whole pipeline did, first pass to last


def diff_facts(tag: Tag, pass_name: str) -> dict[str, Any]:
    if pass_name in PASS_SETS and not any(e.name == pass_name for e in tag.passes):
        if not tag.passes:
            raise DumpError(f"tag {tag.name!r} ran no passes: there is nothing to diff")
        first, last = tag.passes[0], tag.passes[-1]
        before_stage, after_stage = tag.stage_before_pass(first.name), f"after:{last.name}"
        name, matches = pass_name, sum(tag.pass_matches.get(e.name) or 0 for e in tag.passes)
    else:
        entry = tag.pass_entry(pass_name)
        before_stage, after_stage = tag.stage_before_pass(pass_name), f"after:{entry.name}"
        name, matches = entry.name, tag.pass_matches.get(entry.name)
    before_file, before_src = tag.read_stage(before_stage)
    after_file, after_src = tag.read_stage(after_stage)
    diff = analysis.diff_codes(analysis.parse_source(before_src, before_file), analysis.parse_source(after_src, after_file))
    return {"tag": tag.name, "pass": name, "matches": matches,
            "before": {"stage": before_stage, "file": before_file}, "after": {"stage": after_stage,
                                                                             "file": after_file}, **diff}


def graph_output(tag: Tag, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.piece is not None:
        tag.piece(args.piece)
    tg = analysis.build_tag_graph(tag, with_inputs=args.inputs, only_piece=args.piece)
    pieces = [p for p in tag.pieces if args.piece is None or p["index"] == args.piece]
    dot = picture.to_dot(tag, tg.graph, pieces)
    renderer = "graphviz" if args.format == "svg" else None
    if args.format == "dot":
        content = dot
    elif args.format == "svg":
        content = picture.to_svg(dot)
    else:
        use_dot = args.engine == "graphviz" or (args.engine == "auto" and picture.dot_binary() is not None)
        svg = picture.to_svg(dot) if use_dot else None
        renderer = "graphviz" if use_dot else "builtin"
        facts = [f for f in analysis.piece_facts(tag, tg) if args.piece is None or f["index"] == args.piece]
        content = picture.to_html(tag, tg.graph, facts, svg, pieces)
    facts = {"tag": tag.name, "format": args.format, "renderer": renderer, "output": args.output,
             "nodes": tg.graph.number_of_nodes(), "edges": tg.graph.number_of_edges(),
             "clusters": [{"piece": p["index"], "is_splitting_op": bool(p.get("is_splitting_op")),
                           "nodes": sum(1 for _, d in tg.graph.nodes(data=True) if d.get("piece") == p["index"])}
                          for p in pieces]}
    return content, facts


def _compiled_ops(tag: Tag) -> Counter:
    """Ops of what was compiled (after passes) summed over compiled pieces; the traced ops otherwise."""
    total: Counter = Counter()
    for piece in tag.manifest.get("pieces", []):
        if not piece.get("is_splitting_op"):
            total.update(piece.get("compiled_op_counts") or piece.get("op_counts") or {})
    return total


def _compiled_op_facts(tag_a: Tag, tag_b: Tag) -> dict[str, Any]:
    ca, cb = _compiled_ops(tag_a), _compiled_ops(tag_b)
    return {"compiled_op_deltas": {op: {"a": ca[op], "b": cb[op], "delta": cb[op] - ca[op]}
                                   for op in sorted(set(ca) | set(cb), key=lambda o: (-abs(cb[o] - ca[o]), o))
                                   if ca[op] != cb[op]}}


def compare_facts(a: Dump, b: Dump) -> dict[str, Any]:
    tags = []
    for name in list(a.tags) + [t for t in b.tags if t not in a.tags]:
        in_a, in_b = name in a.tags, name in b.tags
        entry: dict[str, Any] = {"tag": name, "in_a": in_a, "in_b": in_b}
        if in_a and in_b:
            sa, sb = tag_summary(a.tags[name]), tag_summary(b.tags[name])
            ca, cb = Counter(), Counter()
            for p in sa["pieces"]:
                ca.update(p["op_counts"])
            for p in sb["pieces"]:
                cb.update(p["op_counts"])
            entry.update(ops_a=sa["totals"]["ops"], ops_b=sb["totals"]["ops"],
                         ops_after_passes={"a": sa["totals"]["ops_after_passes"], "b": sb["totals"]["ops_after_passes"]},
                         op_deltas={op: {"a": ca[op], "b": cb[op], "delta": cb[op] - ca[op]}
                                    for op in sorted(set(ca) | set(cb), key=lambda o: (-abs(cb[o] - ca[o]), o))
                                    if ca[op] != cb[op]})
            for key in ("pieces", "compiled_pieces", "splitting_pieces"):
                entry[key] = {"a": sa["totals"][key], "b": sb["totals"][key]}
            entry["longest_chain"] = {"a": sa["longest_chain"], "b": sb["longest_chain"]}
            entry["timings_s"] = {k: {"a": sa["timings_s"].get(k), "b": sb["timings_s"].get(k)}
                                  for k in sorted(set(sa["timings_s"]) | set(sb["timings_s"]))}
            entry["pass_matches"] = {k: {"a": sa["pass_matches"].get(k), "b": sb["pass_matches"].get(k)}
                                     for k in list(sa["pass_matches"]) + [k for k in sb["pass_matches"]
                                                                          if k not in sa["pass_matches"]]}
            entry.update(_compiled_op_facts(a.tags[name], b.tags[name]))
            conf_a, conf_b = a.tags[name].config, b.tags[name].config
            entry["config_changes"] = {k: {"a": conf_a.get(k), "b": conf_b.get(k)}
                                       for k in sorted(set(conf_a) | set(conf_b))
                                       if k not in ("dump_dir", "cache_dir") and conf_a.get(k) != conf_b.get(k)}
            entry["backend"] = {"a": sa["backend"], "b": sb["backend"]}
            entry["capture"] = {"a": sa["capture"], "b": sb["capture"]}
        tags.append(entry)
    return {"a": a.path, "b": b.path, "tags": tags}


# ---- entry point --------------------------------------------------------------------------------
def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(_normalise_argv(list(argv)))
    dump = load_dump(args.dump_dir)
    command = args.command or "summary"
    text: str
    if command == "summary":
        facts = summary_facts(dump)
        text = render.render_summary(facts)
    elif command == "ops":
        facts = ops_facts(dump.tag(args.tag), args.piece, args.stage)
        text = render.render_ops(facts)
    elif command == "show":
        tag = dump.tag(args.tag)
        file_name, source = tag.read_stage(args.stage)
        codes = analysis.parse_source(source, file_name)
        facts = {"tag": tag.name, "stage": args.stage, "file": file_name, "num_ops": sum(len(c.ops) for c in codes),
                 "op_counts": analysis.op_counts(codes), "source": source}
        text = source.rstrip("\n")
    elif command == "diff":
        facts = diff_facts(dump.tag(args.tag), args.pass_name)
        text = render.render_diff(facts)
    elif command == "graph":
        content, facts = graph_output(dump.tag(args.tag), args)
        if args.output:
            try:
                with open(args.output, "w", encoding="utf-8") as f:
                    f.write(content)
            except OSError as e:
                raise DumpError(f"cannot write {args.output}: {e.strerror}") from None
            text = (f"wrote {args.output}: {args.format} ({facts['renderer'] or 'dot source'}), {facts['nodes']} nodes, "
                    f"{facts['edges']} edges, {len(facts['clusters'])} piece clusters")
        else:
            facts["content"] = content
            text = content.rstrip("\n")
    else:
        facts = compare_facts(dump, load_dump(args.other))
        text = render.render_compare(facts)
    print(json.dumps(facts, indent=2, default=str) if args.json else text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except DumpError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a malformed dump we did not anticipate: still one line, unless debugging
        if os.environ.get("GRAPHMODE_INSPECT_DEBUG"):
            raise
        print(f"{PROG}: could not read the dump: {type(e).__name__}: {e} "
              f"(set GRAPHMODE_INSPECT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1

