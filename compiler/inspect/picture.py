"""The split graph of a tag as a picture: Graphviz DOT, SVG (through ``dot``), or a standalone HTML page.

One ``subgraph cluster_<N>`` per piece, pieces coloured, splitting ops drawn red with a double
border, cross-piece edges bold, in-place edges (a splitting op writing its ``out`` argument) dashed.
HTML opens from disk without a server: the SVG is inline (Graphviz's when ``dot`` is installed,
otherwise a layered layout computed here), with inline CSS/JS and no external URL.
"""
from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from typing import Any

import networkx as nx

from compiler.inspect.analysis import is_custom_op
from compiler.inspect.reader import DumpError, Tag

PALETTE = ["#dbe9ff", "#dff5e1", "#fff2cc", "#e8e0ff", "#d9f3f5", "#fde2cf", "#eaf1d4", "#f3dcec"]
BORDER = ["#6b9be0", "#5fb36b", "#d6b43c", "#8f78d8", "#4fb1bb", "#e08b4f", "#93ad52", "#c474a8"]
SPLIT_FILL, SPLIT_BORDER, SPLIT_CLUSTER = "#ff8a80", "#c62828", "#fde7e7"
CUSTOM_FILL = "#ffd180"
DOT_HINT = ("Graphviz 'dot' is not installed, so no SVG can be made: install it with `apt-get install graphviz` "
            "(Debian/Ubuntu; `brew install graphviz` on macOS; `pip install graphviz` is only the Python binding "
            "and still needs the binary), or use --format dot / --format html")


def piece_colours(index: int, splitting: bool) -> tuple[str, str]:
    return (SPLIT_CLUSTER, SPLIT_BORDER) if splitting else (PALETTE[index % len(PALETTE)], BORDER[index % len(BORDER)])


def display_op(op: str) -> str:
    """Shorter op names for pictures (``_VariableFunctionsClass.rsqrt`` -> ``torch.rsqrt``)."""
    return op.replace("_VariableFunctionsClass.", "torch.")


def _q(text: Any) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _cluster_label(piece: dict[str, Any], g: nx.DiGraph) -> str:
    if piece.get("is_splitting_op"):
        return f"piece {piece['index']} · splitting op"
    n = sum(1 for _, d in g.nodes(data=True) if d.get("piece") == piece["index"])
    return f"piece {piece['index']} · {piece.get('name', '')} · compiled · {n} ops"


def to_dot(tag: Tag, g: nx.DiGraph, pieces: list[dict[str, Any]] | None = None) -> str:
    pieces = tag.pieces if pieces is None else pieces
    n_ops = sum(1 for _, d in g.nodes(data=True) if d.get("piece") is not None)
    lines = [f"digraph {_q(tag.name)} {{",
             f"  graph [rankdir=TB, fontname=\"Helvetica\", fontsize=12, labelloc=t, newrank=true, "
             f"label={_q(f'{tag.name}: {len(pieces)} pieces, {n_ops} ops')}];",
             "  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=9, height=0.3];",
             "  edge [color=\"#555555\", arrowsize=0.6];"]
    for piece in pieces:
        index, splitting = piece["index"], bool(piece.get("is_splitting_op"))
        fill, border = piece_colours(index, splitting)
        lines.append(f"  subgraph cluster_{index} {{")
        lines.append(f"    label={_q(_cluster_label(piece, g))}; style=\"rounded,filled\"; fillcolor={_q(fill)}; "
                     f"color={_q(border)}; penwidth={2 if splitting else 1};")
        for node, d in g.nodes(data=True):
            if d.get("piece") != index:
                continue
            attrs = {"label": f"{display_op(d['op'])}\n{d['label']}", "tooltip": f"{d['label']} = {d['op']} (line {d.get('line')})"
                     f"\n{d.get('text', '')}", "fillcolor": "white", "color": border}
            if d.get("splitting"):
                attrs.update(fillcolor=SPLIT_FILL, color=SPLIT_BORDER, penwidth="2", peripheries="2",
                             fontname="Helvetica-Bold")
            elif is_custom_op(d["op"]):
                attrs.update(fillcolor=CUSTOM_FILL)
            lines.append(f"    {_q(node)} [" + ", ".join(f"{k}={_q(v)}" for k, v in attrs.items()) + "];")
        lines.append("  }")
    for node, d in g.nodes(data=True):
        if d.get("piece") is None:
            lines.append(f"  {_q(node)} [label={_q(d['label'])}, shape=plaintext, style=\"\", fontcolor=\"#777777\"];")
    for u, v, d in g.edges(data=True):
        style = []
        if d.get("inplace"):
            style.append('style=dashed, color="#c62828"')
        elif d.get("cross"):
            style.append("penwidth=2")
        lines.append(f"  {_q(u)} -> {_q(v)}" + (f" [{', '.join(style)}]" if style else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_binary() -> str | None:
    override = os.environ.get("GRAPHMODE_DOT")
    if override is not None:
        return override if os.path.isfile(override) and os.access(override, os.X_OK) else None
    return shutil.which("dot")


def to_svg(dot_source: str) -> str:
    binary = dot_binary()
    if binary is None:
        raise DumpError(DOT_HINT)
    try:
        proc = subprocess.run([binary, "-Tsvg"], input=dot_source, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DumpError(f"running Graphviz dot failed: {e}") from None
    if proc.returncode != 0:
        raise DumpError(f"Graphviz dot failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout


def _inline_svg(svg: str) -> str:
    """Graphviz SVG made fit for inlining in HTML: no XML prolog, doctype, comments or namespace URLs."""
    svg = re.sub(r"<\?xml.*?\?>|<!DOCTYPE.*?>|<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    return svg.strip()


# ---- builtin layered layout (no Graphviz) -----------------------------------------------------
NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 150, 30, 16, 22, 18


def _layers(g: nx.DiGraph, nodes: list[str]) -> list[list[str]]:
    """Longest-path layers, then every node pulled down to just above its first consumer."""
    sub = g.subgraph(nodes)
    order = list(nx.topological_sort(sub))
    depth: dict[str, int] = {}
    for n in order:
        depth[n] = max((depth[p] + 1 for p in sub.predecessors(n)), default=0)
    for n in reversed(order):
        succs = list(sub.successors(n))
        if succs:
            depth[n] = min(depth[s] for s in succs) - 1
    bottom = max(depth.values(), default=0)
    for n in order:  # values only used by later pieces (piece outputs made from nothing): last row
        if not sub.pred[n] and not sub.succ[n]:
            depth[n] = bottom
    layers: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for n in nodes:
        layers[depth[n]].append(n)
    return layers


def _place(g: nx.DiGraph, layers: list[list[str]]) -> dict[str, float]:
    """x of each node: barycentre sweeps for the order, then nodes near their neighbours' mean x."""
    index = {n: i for layer in layers for i, n in enumerate(layer)}

    def sweep(seq: list[list[str]], neighbours) -> None:
        for layer in seq:
            keys = {n: [index[m] for m in neighbours(n) if m in index] for n in layer}
            layer.sort(key=lambda n: sum(keys[n]) / len(keys[n]) if keys[n] else index[n])
            for i, n in enumerate(layer):
                index[n] = i
    for _ in range(3):
        sweep(layers[1:], g.predecessors)
        sweep(list(reversed(layers[:-1])), g.successors)
    x: dict[str, float] = {}
    step = NODE_W + GAP_X
    for layer in layers:
        placed = -step
        for n in layer:
            want = [x[p] for p in g.predecessors(n) if p in x]
            desired = sum(want) / len(want) if want else 0.0
            x[n] = placed = max(desired, placed + step)
    shift = min(x.values(), default=0.0)
    return {n: v - shift + PAD * 2 for n, v in x.items()}


def builtin_svg(tag: Tag, g: nx.DiGraph, pieces: list[dict[str, Any]] | None = None) -> str:
    pos: dict[str, tuple[float, float]] = {}
    clusters, y, right = [], PAD + 10, 0.0
    for piece in tag.pieces if pieces is None else pieces:
        nodes = [n for n, d in g.nodes(data=True) if d.get("piece") == piece["index"]]
        if not nodes:
            continue
        top = y
        y += 26
        layers = _layers(g, nodes)
        xs = _place(g, layers)
        for layer in layers:
            for n in layer:
                pos[n] = (xs[n], y)
                right = max(right, xs[n] + NODE_W)
            y += NODE_H + GAP_Y
        clusters.append((piece, top, y - GAP_Y + 10))
        y += PAD * 2
    total_w = int(right + PAD * 2) if pos else 400
    out = [f'<svg id="graph-svg" width="{total_w}" height="{y}" viewBox="0 0 {total_w} {y}" '
           f'font-family="Helvetica, Arial, sans-serif">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>']
    for piece, top, bottom in clusters:
        fill, border = piece_colours(piece["index"], bool(piece.get("is_splitting_op")))
        out.append(f'<g class="cluster" id="cluster_{piece["index"]}"><title>piece {piece["index"]}</title>'
                   f'<rect x="{PAD}" y="{top}" width="{total_w - 2 * PAD}" height="{bottom - top}" rx="8" '
                   f'fill="{fill}" stroke="{border}"/><text x="{PAD + 8}" y="{top + 17}" font-size="13" '
                   f'font-weight="bold">{html.escape(_cluster_label(piece, g))}</text></g>')
    for u, v, d in g.edges(data=True):
        if u not in pos or v not in pos:
            continue
        (x1, y1), (x2, y2) = pos[u], pos[v]
        style = ' stroke-dasharray="5,3" stroke="#c62828"' if d.get("inplace") else ' stroke="#555"'
        width = 2 if d.get("cross") else 1
        out.append(f'<path class="edge" d="M {x1 + NODE_W / 2} {y1 + NODE_H} C {x1 + NODE_W / 2} {y1 + NODE_H + 30} '
                   f'{x2 + NODE_W / 2} {y2 - 30} {x2 + NODE_W / 2} {y2}" fill="none" stroke-width="{width}"{style} '
                   f'marker-end="url(#arrow)"/>')
    for n, d in g.nodes(data=True):
        if n not in pos:
            continue
        x, yy = pos[n]
        fill, stroke, sw = "white", piece_colours(d["piece"], False)[1], 1
        if d.get("splitting"):
            fill, stroke, sw = SPLIT_FILL, SPLIT_BORDER, 3
        elif is_custom_op(d["op"]):
            fill = CUSTOM_FILL
        op = display_op(d["op"])
        op = op if len(op) <= 24 else op[:23] + "…"
        tip = html.escape(f"{d['label']} = {d['op']} (piece {d['piece']}, line {d.get('line')})\n{d.get('text', '')}")
        out.append(f'<g class="node" data-op="{html.escape(d["op"])}" data-name="{html.escape(d["label"])}">'
                   f'<title>{tip}</title><rect x="{x}" y="{yy}" width="{NODE_W}" height="{NODE_H}" rx="5" '
                   f'fill="{fill}" stroke="{stroke}" stroke-width="{sw}"/>'
                   f'<text x="{x + NODE_W / 2}" y="{yy + 13}" font-size="11" text-anchor="middle">{html.escape(op)}</text>'
                   f'<text x="{x + NODE_W / 2}" y="{yy + 25}" font-size="9" fill="#666" text-anchor="middle">'
                   f'{html.escape(d["label"])}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


_CSS = """body{font-family:Helvetica,Arial,sans-serif;margin:0;color:#222}header{padding:10px 16px;background:#f4f4f4;
border-bottom:1px solid #ddd}h1{font-size:18px;margin:0 0 6px}table{border-collapse:collapse;font-size:12px}
td,th{padding:2px 8px;border-bottom:1px solid #e4e4e4;text-align:right}th{background:#fafafa}td:first-child,
th:first-child{text-align:left}#bar{margin:8px 0}#graph{overflow:auto;height:calc(100vh - 230px);cursor:grab}
.hit rect,.hit polygon,.hit path{stroke:#d500f9!important;stroke-width:4px!important}.legend span{display:inline-block;
padding:1px 6px;margin-right:6px;border:1px solid #999;border-radius:4px;font-size:12px}#info{font-size:12px;color:#444}"""

_JS = """(function(){var box=document.getElementById('graph'),svg=box.querySelector('svg'),scale=1;
var w0=svg.width.baseVal.value,h0=svg.height.baseVal.value;function zoom(f){scale=Math.max(0.05,Math.min(8,scale*f));
svg.setAttribute('width',w0*scale);svg.setAttribute('height',h0*scale);}
document.getElementById('zin').onclick=function(){zoom(1.25)};document.getElementById('zout').onclick=function(){zoom(0.8)};
document.getElementById('zfit').onclick=function(){scale=1;zoom(Math.min(box.clientWidth/w0,box.clientHeight/h0))};
box.addEventListener('wheel',function(e){if(e.ctrlKey||e.metaKey){e.preventDefault();zoom(e.deltaY<0?1.15:0.87)}},{passive:false});
var drag=null;box.addEventListener('mousedown',function(e){drag=[e.clientX,e.clientY,box.scrollLeft,box.scrollTop]});
window.addEventListener('mouseup',function(){drag=null});box.addEventListener('mousemove',function(e){if(drag){
box.scrollLeft=drag[2]-(e.clientX-drag[0]);box.scrollTop=drag[3]-(e.clientY-drag[1])}});
var nodes=svg.querySelectorAll('g.node');document.getElementById('find').oninput=function(e){var q=e.target.value.toLowerCase(),n=0;
nodes.forEach(function(g){var hit=q&&g.textContent.toLowerCase().indexOf(q)>=0;g.classList.toggle('hit',!!hit);if(hit)n++});
document.getElementById('info').textContent=q?n+' matching ops':'';};
nodes.forEach(function(g){g.addEventListener('click',function(){var t=g.querySelector('title');
document.getElementById('info').textContent=t?t.textContent:''})});})();"""


def to_html(tag: Tag, g: nx.DiGraph, facts: list[dict[str, Any]], svg: str | None,
            pieces: list[dict[str, Any]] | None = None) -> str:
    """A page that opens from disk: inline SVG (Graphviz's if given, else the builtin layout)."""
    body_svg = _inline_svg(svg) if svg is not None else builtin_svg(tag, g, pieces)
    renderer = "Graphviz dot" if svg is not None else "builtin layered layout"
    rows = "".join(f"<tr><td>{p['index']}</td><td>{html.escape(str(p.get('name')))}</td>"
                   f"<td>{'splitting op' if p['is_splitting_op'] else 'compiled'}</td><td>{p['num_ops']}</td>"
                   f"<td>{p['longest_chain']}</td><td>{p['inputs']}</td><td>{p['outputs']}</td></tr>" for p in facts)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>graphmode {html.escape(tag.name)}</title><style>{_CSS}</style></head>
<body><header><h1>graphmode dump · tag {html.escape(tag.name)} · backend {html.escape(str(tag.backend))}</h1>
<table><tr><th>piece</th><th>name</th><th>kind</th><th>ops</th><th>longest chain</th><th>inputs</th><th>outputs</th></tr>
{rows}</table>
<div id="bar"><button id="zin">+</button> <button id="zout">&minus;</button> <button id="zfit">fit</button>
<input id="find" placeholder="highlight op (e.g. attention)" size="30"> <span class="legend">
<span style="background:{SPLIT_FILL}">splitting op</span><span style="background:{CUSTOM_FILL}">custom op</span>
<span>bold edge: crosses pieces</span><span style="color:{SPLIT_BORDER}">dashed: written in place</span></span>
<span id="info"></span> <small>({renderer}; ctrl+wheel zooms, drag pans, click a node for its code)</small></div>
</header><div id="graph">{body_svg}</div><script>{_JS}</script></body></html>
"""
