"""Reading the stored graph code with ``ast`` (never executed) and analysing it with networkx.

Every statement FX generates for a node is ``name = <expr>``; the expression's shape tells the op,
named the way ``compiler.split.node_target_name`` names it in the manifest's ``op_counts``:
``torch.ops.ns.op.overload(...)`` -> ``ns::op.overload`` (``.default`` dropped), ``x.view(...)``
-> ``Tensor.view``, ``a + b`` -> ``add``, ``x[0]`` -> ``getitem``, ``torch.rsqrt(...)`` ->
``_VariableFunctionsClass.rsqrt``, ``torch.nn.functional.silu(...)`` -> ``silu``,
``self.submod_0(...)`` -> ``submod_0``. ``y = x`` (placeholder renames), ``self.attr`` (get_attr)
and ``a = b = None`` (frees) are not ops.
"""
from __future__ import annotations

import ast
import difflib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx

from compiler.inspect.reader import DumpError, Tag

BUILTIN_NAMESPACES = ("aten", "prim", "prims", "builtins")
_BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "truediv", ast.FloorDiv: "floordiv",
           ast.Mod: "mod", ast.Pow: "pow", ast.MatMult: "matmul", ast.BitAnd: "and_", ast.BitOr: "or_",
           ast.BitXor: "xor", ast.LShift: "lshift", ast.RShift: "rshift"}
_UNARY = {ast.USub: "neg", ast.UAdd: "pos", ast.Invert: "invert", ast.Not: "not_"}
_COMPARE = {ast.Eq: "eq", ast.NotEq: "ne", ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge",
            ast.Is: "is_", ast.IsNot: "is_not"}
# Python-level functions living directly in ``torch`` (their qualname is the bare name).
_TORCH_PY_FUNCTIONS = ("sym_", "_check", "_assert", "_sym_")


@dataclass
class Stmt:
    name: str  # the FX node name (assignment target)
    op: str | None  # op name as in the manifest; None for renames / get_attr
    kind: str  # call_function | call_method | call_module | get_attr | alias
    inputs: list[str]  # names of earlier values (params or statements) it reads
    line: int
    text: str


@dataclass
class GraphCode:
    """One ``def`` of a stored file: its parameters, op statements and returned names."""
    name: str
    params: list[tuple[str, str | None]]  # (name, annotation source)
    stmts: list[Stmt] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def ops(self) -> list[Stmt]:
        return [s for s in self.stmts if s.op is not None]

    def op_counts(self) -> dict[str, int]:
        return dict(Counter(s.op for s in self.ops))

    def tensor_params(self) -> list[str]:
        return [n for n, ann in self.params if not (ann and ("SymInt" in ann or ann in ("int", "float", "bool")))]


def _dotted(expr: ast.AST) -> str | None:
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if isinstance(expr, ast.Name):
        parts.append(expr.id)
        return ".".join(reversed(parts))
    return None


def _function_name(dotted: str) -> str:
    parts = dotted.split(".")
    if parts[0] == "torch" and len(parts) >= 3 and parts[1] == "ops":
        name = f"{parts[2]}::{parts[3]}" if len(parts) > 3 else parts[2]
        if len(parts) > 4 and parts[4] != "default":
            name += "." + parts[4]
        return name
    if parts[0] == "torch" and len(parts) == 2 and not parts[1].startswith(_TORCH_PY_FUNCTIONS):
        return f"_VariableFunctionsClass.{parts[1]}"  # C builtins: torch.rsqrt, torch.cat, torch.empty
    return parts[-1]


def classify(value: ast.AST, local: set[str]) -> tuple[str | None, str]:
    """(op, kind) of one assignment's right-hand side; op None when it is not an op."""
    if isinstance(value, ast.Call):
        func = value.func
        dotted = _dotted(func)
        if dotted is not None:
            root, _, rest = dotted.partition(".")
            if root == "self" and rest:
                return rest, "call_module"
            if root in local and rest and "." not in rest:
                return f"Tensor.{rest}", "call_method"
            return _function_name(dotted), "call_function"
        if isinstance(func, ast.Call) and _dotted(func.func) == "getattr" and len(func.args) == 2:
            owner, attr = _dotted(func.args[0]), func.args[1]
            if owner and owner.startswith("self.") and isinstance(attr, ast.Constant):
                return f"{owner[5:]}.{attr.value}", "call_module"
        return "call", "call_function"
    if isinstance(value, ast.BinOp):
        return _BINOPS.get(type(value.op), type(value.op).__name__.lower()), "call_function"
    if isinstance(value, ast.UnaryOp):
        return _UNARY.get(type(value.op), type(value.op).__name__.lower()), "call_function"
    if isinstance(value, ast.Compare) and len(value.ops) == 1:
        return _COMPARE.get(type(value.ops[0]), type(value.ops[0]).__name__.lower()), "call_function"
    if isinstance(value, ast.Subscript):
        return "getitem", "call_function"
    if isinstance(value, ast.Attribute):
        dotted = _dotted(value)
        if dotted and dotted.startswith("self."):
            return None, "get_attr"
        return "getattr", "call_function"
    return None, "alias"


def parse_source(source: str, file_name: str = "<graph>") -> list[GraphCode]:
    """Every top-level ``def`` of a stored graph file (FX writes one, ``forward``)."""
    try:
        tree = ast.parse(source, filename=file_name)
    except SyntaxError as e:
        raise DumpError(f"{file_name} is not valid Python (line {e.lineno}): {e.msg}") from None
    lines = source.splitlines()
    graphs = []
    for fn in tree.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = [(a.arg, ast.unparse(a.annotation) if a.annotation else None)
                  for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg != "self"]
        code = GraphCode(fn.name, params)
        local = {n for n, _ in params}
        for stmt in fn.body:
            code_line = lines[stmt.lineno - 1].strip() if stmt.lineno <= len(lines) else ""
            if isinstance(stmt, ast.Return):
                code.outputs = _reads(stmt.value, local) if stmt.value is not None else []
                continue
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                target, value = stmt.targets[0].id, stmt.value
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                target, value = f"_stmt_{stmt.lineno}", stmt.value
            else:
                continue  # ``a = b = None`` frees, docstrings, imports
            if isinstance(value, ast.Constant) and value.value is None:
                continue
            op, kind = classify(value, local)
            code.stmts.append(Stmt(target, op, kind, _reads(value, local), stmt.lineno, code_line.split(";")[0]))
            local.add(target)
        graphs.append(code)
    return graphs


def _reads(expr: ast.AST, local: set[str]) -> list[str]:
    seen: list[str] = []
    for node in ast.walk(expr):
        if isinstance(node, ast.Name) and node.id in local and node.id not in seen:
            seen.append(node.id)
    return seen


def op_counts(graphs: Iterable[GraphCode]) -> dict[str, int]:
    total: Counter = Counter()
    for g in graphs:
        total.update(g.op_counts())
    return dict(total)


def namespace(op: str) -> str | None:
    return op.split("::")[0] if "::" in op else None


def is_custom_op(op: str) -> bool:
    ns = namespace(op)
    return ns is not None and ns not in BUILTIN_NAMESPACES


# ---- networkx ---------------------------------------------------------------------------------
def code_dag(code: GraphCode) -> nx.DiGraph:
    """Op statements as nodes, name uses as edges (inputs/params are not nodes)."""
    g = nx.DiGraph()
    ops = {s.name for s in code.ops}
    for s in code.ops:
        g.add_node(s.name, op=s.op)
        for src in s.inputs:
            if src in ops:
                g.add_edge(src, s.name)
    # Values that flow through renames / get_attr still connect the ops around them.
    alias = {s.name: s.inputs for s in code.stmts if s.op is None}
    for s in code.ops:
        for src in s.inputs:
            for origin in alias.get(src, []):
                if origin in ops:
                    g.add_edge(origin, s.name)
    for src, dst in inplace_pairs(code):
        g.add_edge(src, dst, inplace=True)
    return g


def inplace_pairs(code: GraphCode) -> list[tuple[str, str]]:
    """(writer, reader) pairs for custom ops whose result is unused (they work by writing an argument,
    like attention's ``out``): later readers of their arguments depend on them."""
    ops = code.ops
    read = {n for s in ops for n in s.inputs} | set(code.outputs)
    pairs = []
    for i, s in enumerate(ops):
        if not is_custom_op(s.op or "") or s.name in read:
            continue
        for later in ops[i + 1:]:
            if set(later.inputs) & set(s.inputs):
                pairs.append((s.name, later.name))
    return pairs


def longest_chain(g: nx.DiGraph) -> int:
    """Ops on the longest dependency path (0 for an empty graph)."""
    return nx.dag_longest_path_length(g) + 1 if g.number_of_nodes() else 0


def code_metrics(code: GraphCode) -> dict[str, Any]:
    dag = code_dag(code)
    return {"num_ops": len(code.ops), "longest_chain": longest_chain(dag), "inputs": len(code.params),
            "outputs": len(code.outputs), "max_fan_out": max((d for _, d in dag.out_degree()), default=0)}


@dataclass
class TagGraph:
    """The split graph of a tag: every piece's ops, linked across pieces by the values they pass."""
    graph: nx.DiGraph
    pieces: dict[int, GraphCode]
    aligned: int  # piece statements matched to the pre-split graph's names


def load_piece_code(tag: Tag, index: int) -> GraphCode:
    file_name, source = tag.read_stage(f"piece:{index}")
    graphs = parse_source(source, file_name)
    if not graphs:
        raise DumpError(f"{file_name} holds no graph function")
    return graphs[0]


def _original_names(tag: Tag, pieces: dict[int, GraphCode]) -> tuple[dict[tuple[int, str], str], int]:
    """Map (piece, local name) -> name in the pre-split graph, by aligning the op sequences.

    ``split_module`` names a piece's inputs after the pre-split graph's nodes but renames the nodes
    it copies; with ``keep_original_order`` the pieces, concatenated, repeat the pre-split order.
    """
    stage = tag.pre_split_stage()
    if stage is None:
        return {}, 0
    file_name, source = tag.read_stage(stage)
    before = [s for g in parse_source(source, file_name) for s in g.stmts if s.kind != "alias"]
    after = [(i, s) for i in sorted(pieces) for s in pieces[i].stmts if s.kind != "alias"]
    matcher = difflib.SequenceMatcher(None, [s.op or s.kind for s in before],
                                      [s.op or s.kind for _, s in after], autojunk=False)
    mapping: dict[tuple[int, str], str] = {}
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            index, stmt = after[block.b + k]
            mapping[(index, stmt.name)] = before[block.a + k].name
    return mapping, len(mapping)


def build_tag_graph(tag: Tag, with_inputs: bool = False, only_piece: int | None = None) -> TagGraph:
    pieces = {p["index"]: load_piece_code(tag, p["index"]) for p in tag.pieces}
    flagged = {p["index"]: bool(p.get("is_splitting_op")) for p in tag.pieces}
    mapping, aligned = _original_names(tag, pieces)
    g = nx.DiGraph()
    producer: dict[str, str] = {}  # pre-split name -> node id
    for index in sorted(pieces):
        code = pieces[index]
        node_id = {s.name: f"p{index}/{s.name}" for s in code.ops}
        for param in code.params:
            name = param[0]
            src = producer.get(name)
            if src is not None:
                node_id[name] = src
            elif with_inputs and name in {n for s in code.ops for n in s.inputs}:
                node_id[name] = f"in/{name}"
                g.add_node(f"in/{name}", op=None, label=name, piece=None, kind="input", splitting=False)
        alias = {s.name: s.inputs for s in code.stmts if s.op is None}
        for s in code.ops:
            splitting = flagged[index] and tag.is_splitting_op(s.op) if tag.splitting_ops else flagged[index]
            g.add_node(node_id[s.name], op=s.op, label=s.name, piece=index, kind=s.kind, line=s.line,
                       splitting=bool(splitting and s.op != "getitem"), text=s.text)
            for src in s.inputs:
                for origin in [src] + alias.get(src, []):
                    if origin in node_id and node_id[origin] != node_id[s.name]:
                        g.add_edge(node_id[origin], node_id[s.name], cross=node_id[origin].split("/")[0] != f"p{index}")
        for src, dst in inplace_pairs(code):
            g.add_edge(node_id[src], node_id[dst], cross=False, inplace=True)
        for s in code.ops:
            original = mapping.get((index, s.name))
            if original is not None:
                producer[original] = node_id[s.name]
            if not mapping:  # no pre-split graph to align with: fall back to equal names
                producer.setdefault(s.name, node_id[s.name])
    _add_inplace_edges(g, tag, pieces)
    if only_piece is not None:
        keep = {n for n, d in g.nodes(data=True) if d.get("piece") == only_piece}
        keep |= {p for n in keep for p in g.predecessors(n) if g.nodes[p].get("kind") == "input"}
        g = g.subgraph(keep).copy()
    return TagGraph(g, pieces, aligned)


def _add_inplace_edges(g: nx.DiGraph, tag: Tag, pieces: dict[int, GraphCode]) -> None:
    """A splitting piece that returns nothing works by writing an argument (attention's ``out``):
    link its op to the later readers of that argument so the chain runs through it."""
    for piece in tag.pieces:
        index = piece["index"]
        if not piece.get("is_splitting_op") or pieces[index].outputs:
            continue
        inside = [n for n, d in g.nodes(data=True) if d.get("piece") == index and d.get("splitting")]
        for n in inside:
            for p in list(g.predecessors(n)):
                for s in list(g.successors(p)):
                    if (g.nodes[s].get("piece") if g.nodes[s].get("piece") is not None else -1) > index:
                        g.add_edge(n, s, cross=True, inplace=True)


def splitting_points(tag: Tag, tg: TagGraph) -> list[dict[str, Any]]:
    """Fan-in/fan-out of each splitting piece in the linked graph.

    fan_in: distinct tensor values entering the piece; fan_out: ops in later pieces that read a
    value leaving it (returned, or an argument written in place such as attention's ``out``).
    """
    g = tg.graph
    out = []
    for piece in tag.pieces:
        if not piece.get("is_splitting_op"):
            continue
        index = piece["index"]
        inside = [n for n, d in g.nodes(data=True) if d.get("piece") == index]
        preds = {p for n in inside for p in g.predecessors(n) if g.nodes[p].get("piece") != index}
        # Successors include the later readers of arguments written in place (see _add_inplace_edges).
        consumers = {s for n in inside for s in g.successors(n) if g.nodes[s].get("piece") != index}
        code = tg.pieces[index]
        ops = [d["op"] for n, d in g.nodes(data=True) if d.get("piece") == index and d.get("splitting")]
        out.append({"piece": index, "ops": ops, "fan_in": len(code.tensor_params()),
                    "fan_out": len(consumers),
                    "from_pieces": sorted({g.nodes[p].get("piece") for p in preds if g.nodes[p].get("piece") is not None}),
                    "to_pieces": sorted({g.nodes[s].get("piece") for s in consumers})})
    return out


def piece_facts(tag: Tag, tg: TagGraph) -> list[dict[str, Any]]:
    facts = []
    for piece in tag.pieces:
        code = tg.pieces[piece["index"]]
        manifest_counts = piece.get("op_counts") or {}
        ast_counts = code.op_counts()
        facts.append({"index": piece["index"], "name": piece.get("name"),
                      "is_splitting_op": bool(piece.get("is_splitting_op")), "num_nodes": piece.get("num_nodes"),
                      "num_ops": sum(manifest_counts.values()) if manifest_counts else len(code.ops),
                      "op_counts": manifest_counts or ast_counts, "ast_matches_manifest": ast_counts == manifest_counts,
                      **{k: v for k, v in code_metrics(code).items() if k != "num_ops"}, "file": piece.get("file")})
    return facts


def _diff_graph(before: GraphCode | None, after: GraphCode | None) -> tuple[list, list, list]:
    """Nodes removed / added / rewired between two versions of one graph (FX keeps node names)."""
    b = {(s.name, s.op): s for s in (before.ops if before else [])}
    a = {(s.name, s.op): s for s in (after.ops if after else [])}
    removed = [{"name": s.name, "op": s.op, "line": s.line, "code": s.text} for k, s in b.items() if k not in a]
    added = [{"name": s.name, "op": s.op, "line": s.line, "code": s.text} for k, s in a.items() if k not in b]
    changed = [{"name": s.name, "op": s.op, "inputs_before": b[k].inputs, "inputs_after": s.inputs, "line": s.line}
               for k, s in a.items() if k in b and b[k].inputs != s.inputs]
    return removed, added, changed


def diff_codes(before: list[GraphCode], after: list[GraphCode]) -> dict[str, Any]:
    """Nodes removed / added / rewired between two versions of a file of graphs, graph by graph in order
    (a file of pieces holds one graph per piece, and node names repeat across pieces)."""
    removed, added, changed, per_graph = [], [], [], []
    for i in range(max(len(before), len(after))):
        r, a, c = _diff_graph(before[i] if i < len(before) else None, after[i] if i < len(after) else None)
        for entries in (r, a, c):
            for entry in entries:
                entry["graph"] = i
        removed, added, changed = removed + r, added + a, changed + c
        per_graph.append({"graph": i, "removed": len(r), "added": len(a), "changed": len(c)})
    hb, ha = Counter(op_counts(before)), Counter(op_counts(after))
    delta = {op: ha[op] - hb[op] for op in sorted(set(hb) | set(ha)) if ha[op] != hb[op]}
    return {"ops_before": sum(hb.values()), "ops_after": sum(ha.values()), "op_delta": delta,
            "removed": removed, "added": added, "changed": changed, "per_graph": per_graph}
