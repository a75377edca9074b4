"""Plain-text rendering of the inspector's facts: aligned tables, no dependency beyond the stdlib."""
from __future__ import annotations

from typing import Any, Iterable, Sequence


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], indent: int = 2) -> str:
    """Columns aligned; numbers right-aligned, text left-aligned."""
    rows = [[_cell(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    numeric = [all(_is_num(r[i]) for r in rows) and rows != [] for i in range(len(headers))]

    def fmt(cells: Sequence[str]) -> str:
        return " " * indent + "  ".join(c.rjust(w) if num else c.ljust(w)
                                        for c, w, num in zip(cells, widths, numeric)).rstrip()

    lines = [fmt(headers), " " * indent + "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _is_num(text: str) -> bool:
    t = text.lstrip("+-")
    return t.replace(".", "", 1).isdigit() or text == "-"


def seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.3f} s"


def size_bytes(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def signed(n: int | float) -> str:
    return f"+{n}" if n > 0 else str(n)


def render_summary(facts: dict[str, Any]) -> str:
    out = [f"dump {facts['dump']} (format {facts['format_version']}): {len(facts['tags'])} tag(s)"]
    for t in facts["tags"]:
        c, totals = t["config"], t["totals"]
        out += ["", f"== tag {t['tag']} ==",
                f"  config   mode={c.get('mode')} graph_mode={c.get('graph_mode')} backend={t['backend']} "
                f"splitting_ops={','.join(c.get('splitting_ops') or []) or 'none'} "
                f"passes={','.join(c.get('passes') or []) or 'none'}",
                "  timings  " + "  ".join(f"{k}={seconds(t['timings_s'].get(k + '_s'))}"
                                          for k in ("trace", "passes", "compile", "capture")),
                f"  cache    {t['cache']}",
                f"  pieces   {totals['pieces']} ({totals['compiled_pieces']} compiled, {totals['splitting_pieces']} "
                f"splitting) · {totals['ops']} ops traced ({totals['ops_compiled']} in compiled pieces, "
                f"{totals['ops_splitting']} in splitting pieces) · {totals['ops_after_passes']} ops compiled after "
                f"passes · longest chain {t['longest_chain']} ops"]
        cap = t["capture"]
        if cap and cap.get("mode") == "none":
            out.append(f"  capture  none ({cap.get('reason', 'not captured')})")
        elif cap:
            sizes = cap.get("sizes") or []
            shown = ", ".join(map(str, sizes[:8])) + (f", … ({len(sizes)} sizes)" if len(sizes) > 8 else "")
            out.append(f"  capture  mode={cap.get('mode')} sizes=[{shown}] graph pool "
                       f"{size_bytes(cap.get('graph_pool_bytes'))} in {seconds(cap.get('capture_s'))}")
            out += _pool_lines(cap)
        else:
            out.append("  capture  none recorded (the model was compiled but no runtime captured it)")
        out += ["", table(["piece", "name", "kind", "ops", "chain", "in", "out", "top ops"],
                          [[p["index"], p["name"], "SPLIT" if p["is_splitting_op"] else "compiled", p["num_ops"],
                            p["longest_chain"], p["inputs"], p["outputs"], _top(p["op_counts"])] for p in t["pieces"]])]
        if t["splitting_points"]:
            out += ["", "  splitting points (fan-in: tensors entering; fan-out: later ops reading what leaves)",
                    table(["piece", "op", "fan-in", "fan-out", "from pieces", "to pieces"],
                          [[s["piece"], ",".join(s["ops"]), s["fan_in"], s["fan_out"],
                            ",".join(map(str, s["from_pieces"])) or "-", ",".join(map(str, s["to_pieces"])) or "-"]
                           for s in t["splitting_points"]], indent=4)]
        if t["passes"] or t["pass_matches"]:
            names = [p["name"] for p in t["passes"]] + [n for n in t["pass_matches"] if n not in
                                                        {p["name"] for p in t["passes"]}]
            out += ["", "  passes", table(["pass", "matches"], [[n, t["pass_matches"].get(n)] for n in names], 4)]
        else:
            out.append("  passes   none recorded")
        counters = {k: v for k, v in t["counters"].items() if k != "pass_matches"}
        if counters:
            out.append("  counters " + " ".join(f"{k}={v}" for k, v in counters.items()))
    return "\n".join(out)


def _top(counts: dict[str, int], n: int = 3) -> str:
    best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return ", ".join(f"{op}×{c}" for op, c in best)


def render_ops(facts: dict[str, Any]) -> str:
    where = f"piece {facts['piece']}" if facts["piece"] is not None else "all pieces"
    out = [f"tag {facts['tag']}, {where}: {facts['total']} ops, {len(facts['ops'])} distinct"
           + (f" · longest chain {facts['longest_chain']}" if facts.get("longest_chain") is not None else "")]
    out.append(table(["op", "count", "mark"],
                     [[o["op"], o["count"], " ".join(m for m, on in (("SPLITTING", o["splitting"]),
                                                                     ("custom", o["custom"])) if on)]
                      for o in facts["ops"]]))
    out.append(f"  custom ops: {', '.join(facts['custom_ops']) or 'none'}; "
               f"splitting ops: {', '.join(facts['splitting_ops']) or 'none'}")
    if facts.get("per_piece"):
        out += ["", table(["piece", "kind", "ops", "chain"],
                          [[p["index"], "SPLIT" if p["is_splitting_op"] else "compiled", p["num_ops"],
                            p["longest_chain"]] for p in facts["per_piece"]])]
    if not facts.get("ast_matches_manifest", True):
        out.append("  note: the op counts parsed from the stored code differ from the manifest's")
    return "\n".join(out)


def render_diff(facts: dict[str, Any]) -> str:
    m = facts["matches"]
    out = [f"tag {facts['tag']}, pass {facts['pass']}: {facts['before']['file']} -> {facts['after']['file']}",
           f"  matches {m if m is not None else '-'} · ops {facts['ops_before']} -> {facts['ops_after']} "
           f"({signed(facts['ops_after'] - facts['ops_before'])}) · {len(facts['removed'])} removed, "
           f"{len(facts['added'])} added, {len(facts['changed'])} rewired"]
    if facts["op_delta"]:
        out += ["", table(["op", "delta"], [[op, signed(d)] for op, d in facts["op_delta"].items()])]
    per_graph = facts.get("per_graph") or []
    if len(per_graph) > 1:  # a file of pieces: say which graph (piece, in file order) each change is in
        out += ["", table(["graph", "removed", "added", "rewired"],
                          [[g["graph"], g["removed"], g["added"], g["changed"]] for g in per_graph
                           if g["removed"] or g["added"] or g["changed"]])]
    where = (lambda item: f"[g{item['graph']}] ") if len(per_graph) > 1 else (lambda item: "")
    for title, items in (("removed", facts["removed"]), ("added", facts["added"])):
        if items:
            out += ["", f"  {title}:"] + [f"    {'-' if title == 'removed' else '+'} {where(i)}{i['code']}"
                                          for i in items]
    if facts["changed"]:
        out += ["", "  rewired (same node, other inputs):"]
        out += [f"    ~ {where(c)}{c['name']} = {c['op']}({', '.join(c['inputs_before'])}) -> "
                f"({', '.join(c['inputs_after'])})" for c in facts["changed"]]
    if not (facts["removed"] or facts["added"] or facts["changed"]):
        out.append("  the pass left the graph unchanged")
    return "\n".join(out)


def render_compare(facts: dict[str, Any]) -> str:
    out = [f"A = {facts['a']}", f"B = {facts['b']}"]
    for t in facts["tags"]:
        out += ["", f"== tag {t['tag']} =="]
        if not (t["in_a"] and t["in_b"]):
            out.append(f"  only in {'A' if t['in_a'] else 'B'}")
            continue
        after = t["ops_after_passes"]
        rows = [["ops traced", t["ops_a"], t["ops_b"], signed(t["ops_b"] - t["ops_a"])],
                ["ops compiled after passes", after["a"], after["b"], signed(after["b"] - after["a"])]]
        for key in ("pieces", "compiled_pieces", "splitting_pieces", "longest_chain"):
            rows.append([key.replace("_", " "), t[key]["a"], t[key]["b"], signed(t[key]["b"] - t[key]["a"])])
        for key, v in t["timings_s"].items():
            delta = None if v["a"] is None or v["b"] is None else f"{v['b'] - v['a']:+.3f}"
            rows.append([key, v["a"], v["b"], delta])
        out.append(table(["", "A", "B", "B-A"], rows))
        if t["config_changes"]:
            out += ["", "  config changes:"] + [f"    {k}: {v['a']!r} -> {v['b']!r}" for k, v in t["config_changes"].items()]
        if t["op_deltas"]:
            out += ["", table(["op", "A", "B", "B-A"], [[op, v["a"], v["b"], signed(v["delta"])]
                                                       for op, v in t["op_deltas"].items()])]
        else:
            out.append("  same op histogram")
        if t["compiled_op_deltas"]:
            out += ["", "  compiled graphs (after passes):",
                    table(["op", "A", "B", "B-A"], [[op, v["a"], v["b"], signed(v["delta"])]
                                                    for op, v in list(t["compiled_op_deltas"].items())[:20]])]
        if t["pass_matches"]:
            out += ["", table(["pass", "matches A", "matches B"],
                              [[n, v["a"], v["b"]] for n, v in t["pass_matches"].items()])]
    return "\n".join(out)


def _pool_lines(cap: dict) -> list[str]:
    """What each graph kind added to the pool, the sizes that added most, and the estimate the KV cache
    was sized with (captures recorded before these fields existed show none of it)."""
    by_size = cap.get("graph_pool_by_size") or []
    if not by_size:
        return []
    kinds: dict[str, float] = {}
    for kind, _size, mib in by_size:
        kinds[kind] = kinds.get(kind, 0.0) + mib
    top = sorted(by_size, key=lambda e: -e[2])[:3]
    expected = cap.get("graph_pool_estimate_bytes")
    return [f"  pool     " + ", ".join(f"{kind} {mib:.1f} MiB" for kind, mib in kinds.items())
            + f" (full sizes {cap.get('full_sizes')}); most: "
            + ", ".join(f"{kind} {size} +{mib:.1f} MiB" for kind, size, mib in top)
            + (f"; expected {size_bytes(expected)} when the KV cache was sized" if expected is not None else "")]
