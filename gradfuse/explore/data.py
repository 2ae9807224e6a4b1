"""What the explore page shows, as plain JSON-able dicts: the graphs of each view with their group
tree and precomputed layouts, and the reports that link to them (fusion, memory plan, saved
values, generated source, gradient health, kernel times).

Groups: a node belongs to its DSL scope (``blocks.0.attn`` lies in ``blocks`` and ``blocks.0``)
and, in the fused view, to its kernel inside its kernel's scope. A layer's forward, backward
and update ops share the layer's scope, so a backward node sits beside the forward node it
differentiates. One layout is made per group: the graph with that group's path expanded (its
members and, around them, the collapsed siblings of every group on the path), and one for the
collapsed top level. Every node is drawn in the layouts of its own group's path only, so the
total size grows with nodes times depth, not with the number of expansion states.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass

from gradfuse.ir.graph import ArgKind, Graph, Node
from gradfuse.ir.printer import print_node
from gradfuse.ir.registry import role

from .layout import layered_layout

ROOT = ""
CHAR_W, NODE_H, GROUP_H, MAX_CHARS = 6.4, 30, 36, 34
_OF = re.compile(r"^(?:vjp\([^)]*\)|sgd|adam) of %([^\s:]+)")
_ACCUMULATE = re.compile(r"^accumulate: %(\S+) is used")


@dataclass
class ArgNode:
    """A graph argument drawn as a node (its op is its kind: input, param, state)."""

    kind: ArgKind
    value: object

    @property
    def outputs(self):
        return (self.value,)


def _fit(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 1] + "…"


def _box(label: str, sub: str, h: float) -> tuple[float, float]:
    return max(len(_fit(label)), len(_fit(sub)), 4) * CHAR_W + 18, h


def _known_scopes(g: Graph) -> set[str]:
    out = set()
    for n in g.nodes:
        parts = n.scope.split(".") if n.scope else []
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _scope_of_name(name: str, scopes: set[str]) -> str:
    """The longest known scope that ``name`` (``fc1.weight.momentum``) lies in, or the root."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in scopes:
            return prefix
    return ROOT


def _chain(scope: str) -> list[str]:
    parts = scope.split(".") if scope else []
    return ["s:" + ".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def source_lines(graphs: list[Graph], folder: str | None) -> dict[str, dict[int, str]]:
    """The model's lines that nodes come from, by file and line (files found next to the model)."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for g in graphs:
        for n in g.nodes:
            if n.loc is not None:
                wanted[n.loc.file].add(n.loc.line)
    out: dict[str, dict[int, str]] = {}
    for file, lines in wanted.items():
        path = file if os.path.isabs(file) else os.path.join(folder or ".", file)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        out[file] = {i: text[i - 1].strip() for i in sorted(lines) if 0 < i <= len(text)}
    return out


def graph_view(key: str, title: str, g: Graph, batch: int, *, by_kernel: bool = False) -> dict:
    """One view: its nodes (arguments first), groups and a layout per group."""
    scopes = _known_scopes(g)
    producers = {}
    units: list = [ArgNode(kind, v) for kind, v in g.args] + list(g.nodes)
    for u in units:
        for v in u.outputs:
            producers[v] = u
    index = {id(u): i for i, u in enumerate(units)}
    by_name = {v.name: u for u in units for v in u.outputs}
    hidden = [isinstance(u, Node) and role(u) == "immediate" for u in units]

    def scope_of(u) -> str:
        if isinstance(u, ArgNode):
            return _scope_of_name(u.value.name, scopes)
        if u.scope:
            return u.scope
        m = _OF.match(u.note or "")
        if m and u.stage == "update":  # "sgd of %fc1.weight": the update belongs to its param's layer
            return _scope_of_name(m.group(1) + ".x", scopes)
        m = _ACCUMULATE.match(u.note or "")
        if m and m.group(1) in by_name and by_name[m.group(1)] is not u:  # a gradient sum: the layer of its value
            return scope_of(by_name[m.group(1)])
        return ROOT

    kernel_scope: dict[str, str] = {}  # a kernel lies in the scope of its anchor (else of its first op)
    if by_kernel:
        for n in g.nodes:
            if n.kernel is not None and role(n) in ("gemm", "reduction", "row"):
                kernel_scope.setdefault(n.kernel, scope_of(n))
        for n in g.nodes:
            if n.kernel is not None:
                kernel_scope.setdefault(n.kernel, scope_of(n))

    groups: dict[str, dict] = {ROOT: {"id": ROOT, "label": f"@{g.name}", "parent": None, "chain": [], "n": 0}}
    chains: list[list[str]] = []
    for u in units:
        kernel = getattr(u, "kernel", None) if by_kernel else None
        scope = kernel_scope[kernel] if kernel else scope_of(u)
        chain = _chain(scope) + (["k:" + kernel] if kernel else [])
        parent = ROOT
        for i, gid in enumerate(chain):
            if gid not in groups:
                label = f"{gid[2:]}" if gid.startswith("k:") else f"@{gid[2:]}"
                groups[gid] = {"id": gid, "label": label, "parent": parent, "chain": chain[:i + 1], "n": 0}
            parent = gid
        chains.append(chain)
    for chain, h in zip(chains, hidden, strict=True):
        if not h:
            for gid in [ROOT, *chain]:
                groups[gid]["n"] += 1
    first: dict[str, int] = {}  # a group's rank in the layout: its first op (its params come first)
    for i, chain in reversed(list(enumerate(chains))):
        if not hidden[i]:
            for gid in chain:
                if gid not in first or i >= len(g.args) or first[gid] < len(g.args):
                    first[gid] = i
    groups = {gid: grp for gid, grp in groups.items() if gid == ROOT or grp["n"]}
    kernel_ops: dict[str, dict[str, None]] = defaultdict(dict)  # a kernel's ops, in order, once each
    for u, chain, h in zip(units, chains, hidden, strict=True):
        if chain and chain[-1].startswith("k:") and not h:
            kernel_ops[chain[-1]][u.op] = None
    for gid, grp in groups.items():
        if gid.startswith("k:"):
            grp["sub"] = "+".join(kernel_ops[gid])
        elif gid != ROOT:
            grp["sub"] = f"{grp['n']} ops"

    nodes = []
    for u, chain, h in zip(units, chains, hidden, strict=True):
        out = u.outputs[0]
        rec = {"v": out.name, "t": str(out.type), "g": chain[-1] if chain else ROOT,
               "b": out.type.nbytes({s: batch for s in out.type.symbols})}
        if isinstance(u, ArgNode):
            rec.update(o=u.kind.value, st="forward", ir=f"{u.kind.value} %{out.name}: {out.type}")
        else:
            rec.update(o=u.op, i=[v.name for v in u.inputs], st=u.stage, ir=print_node(u, "").split("  # ")[0])
            if len(u.outputs) > 1:
                rec["outs"] = [v.name for v in u.outputs]
            if u.note:
                rec["note"] = u.note
                m = _OF.match(u.note) or _ACCUMULATE.match(u.note)
                if m:
                    rec["f"] = m.group(1)  # the forward value it differentiates (or accumulates, or updates)
            if u.loc:
                rec["loc"] = str(u.loc)
            if u.scope:
                rec["sc"] = u.scope
            if u.kernel:
                rec["k"] = u.kernel
        if h:
            rec["h"] = 1
        nodes.append(rec)

    # edges between drawn units, bucketed by the pair of groups their ends lie directly in
    buckets: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for j, u in enumerate(units):
        if hidden[j] or isinstance(u, ArgNode):
            continue
        for v in dict.fromkeys(u.inputs):
            p = producers.get(v)
            if p is None or hidden[index[id(p)]]:
                continue
            i = index[id(p)]
            buckets[(nodes[i]["g"], nodes[j]["g"])].append((i, j))

    members: dict[str, list[int]] = defaultdict(list)
    children: dict[str, list[str]] = defaultdict(list)
    for i, rec in enumerate(nodes):
        if not hidden[i]:
            members[rec["g"]].append(i)
    for gid, grp in groups.items():
        if gid != ROOT:
            children[grp["parent"]].append(gid)
    by_lca: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ga, gb in buckets:
        ca, cb = groups[ga]["chain"], groups[gb]["chain"]
        m = 0
        while m < len(ca) and m < len(cb) and ca[m] == cb[m]:
            m += 1
        by_lca[ca[m - 1] if m else ROOT].append((ga, gb))
    layouts = {gid: _layout_state(gid, groups, nodes, members, children, buckets, by_lca, first) for gid in groups}
    return {"key": key, "title": title, "nodes": nodes, "groups": groups, "layouts": layouts}


def _layout_state(gid: str, groups: dict, nodes: list[dict], members: dict[str, list[int]],
                  children: dict[str, list[str]], buckets: dict[tuple[str, str], list[tuple[int, int]]],
                  by_lca: dict[str, list[tuple[str, str]]], first: dict[str, int]) -> dict:
    """The layout with ``gid``'s path expanded: its members, and every sibling of the path collapsed.
    Only the edges whose ends meet in a group of the path can show: the others join two nodes of
    one collapsed box."""
    if gid.startswith("k:"):  # a kernel: its ops alone, drawn over its box in its scope's layout
        return _inset(gid, groups, nodes, members, buckets)
    path = groups[gid]["chain"]
    open_ = [ROOT, *path]
    is_open = set(open_)

    def item_of_group(g: str) -> str:  # the collapsed box that shows g: its ancestor just off the path
        chain = groups[g]["chain"]
        m = 0
        while m < len(path) and chain[m] == path[m]:
            m += 1
        return chain[m]

    items: dict[tuple[str, object], int] = {}
    order: list[tuple[int, tuple[str, object]]] = []

    def add(key, rank: int) -> None:
        if key not in items:
            items[key] = len(items)
            order.append((rank, key))

    for o in open_:
        for i in members[o]:
            add(("n", i), i)
        for c in children[o]:
            if c not in is_open:
                add(("g", c), first[c])

    def item(i: int) -> int:
        g = nodes[i]["g"]
        return items[("n", i) if g in is_open else ("g", item_of_group(g))]

    edges = set()
    for o in open_:
        for ga, gb in by_lca[o]:
            if ga not in is_open and gb not in is_open:
                a, b = items[("g", item_of_group(ga))], items[("g", item_of_group(gb))]
                if a != b:
                    edges.add((a, b))
                continue
            for i, j in buckets[(ga, gb)]:
                a, b = item(i), item(j)
                if a != b:
                    edges.add((a, b))
    return _place(sorted(order), items, edges, groups, nodes)


def _inset(gid: str, groups: dict, nodes: list[dict], members: dict[str, list[int]],
           buckets: dict[tuple[str, str], list[tuple[int, int]]]) -> dict:
    items = {("n", i): k for k, i in enumerate(members[gid])}
    edges = {(items[("n", i)], items[("n", j)]) for i, j in buckets.get((gid, gid), []) if i != j}
    out = _place([(i, ("n", i)) for i in members[gid]], items, edges, groups, nodes)
    out["inset"] = groups[gid]["parent"]
    return out


def _place(ranked: list, items: dict, edges: set, groups: dict, nodes: list[dict]) -> dict:
    """Lay out in the graph's order (arguments first): back edges are then those against it."""
    renumber = {items[key]: k for k, (_, key) in enumerate(ranked)}
    keys = [key for _, key in ranked]
    sizes = []
    for kind, ref in keys:
        if kind == "n":
            rec = nodes[ref]
            sizes.append(_box(rec["o"], f"%{rec['v']}", NODE_H))
        else:
            grp = groups[ref]
            sizes.append(_box(grp["label"], grp.get("sub", ""), GROUP_H))
    edge_list = sorted((renumber[a], renumber[b]) for a, b in edges)
    placed = layered_layout(sizes, edge_list)
    out_items = [[kind, ref, round(placed.x[k]), round(placed.y[k]), round(sizes[k][0]), round(sizes[k][1])]
                 for k, (kind, ref) in enumerate(keys)]
    out_edges = [[a, b, [round(c) for pt in pts for c in pt]] for (a, b), pts in zip(edge_list, placed.edges,
                                                                                    strict=True)]
    return {"items": out_items, "edges": out_edges, "w": round(placed.width), "h": round(placed.height)}
