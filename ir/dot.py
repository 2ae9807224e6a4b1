"""Graphviz views of a graph: DOT text (deterministic), and SVG where the ``dot`` binary exists.

Arguments are ellipses coloured by kind, nodes are boxes (the nodes autodiff emitted in another
colour) grouped in one cluster per DSL scope and direction, and outputs and state updates are
sinks. An edge carries the operand index when its node has several operands, and
the value's name when its producer has several results; ``mul %x, %x`` keeps both its edges.
"""

from __future__ import annotations

import shutil
import subprocess

from .graph import ArgKind, Graph, Value
from .printer import format_attrs, format_comment, print_value_type

ARG_COLORS = {ArgKind.input: "#cfe2ff", ArgKind.param: "#d1e7dd", ArgKind.state: "#fff3cd"}
FORWARD_COLOR = "#ffffff"
BACKWARD_COLOR = "#f8d7da"
SINK_COLOR = "#e9ecef"


def quote(text: str) -> str:
    """A DOT string literal. Line breaks become DOT's centred ``\\n``; other unprintable
    characters (a NUL ends dot's string, a lone surrogate cannot be encoded) show as ``\\uXXXX``."""
    out = []
    for c in text:
        if c == "\n":
            out.append("\\n")
        elif c in '"\\':
            out.append("\\" + c)
        else:
            out.append(c if c.isprintable() else f"\\\\u{ord(c):04x}")
    return '"' + "".join(out) + '"'


def _attrs(**kw: str) -> str:
    return "[" + ", ".join(f"{k}={quote(v)}" for k, v in kw.items()) + "]"


def to_dot(graph: Graph) -> str:
    # newrank: rank nodes across clusters; without it dot fails to route some edges ("lost edge")
    lines = [f"digraph {quote(graph.name)} {{",
             "  newrank=true;",
             '  node [fontname="monospace", fontsize=10];',
             '  edge [fontname="monospace", fontsize=9];']
    source: dict[Value, tuple[str, bool]] = {}  # value -> (DOT id, its producer has several results)
    for i, (kind, v) in enumerate(graph.args):
        source[v] = (f"a{i}", False)
        lines.append(f"  a{i} " + _attrs(label=f"{kind.value} {print_value_type(v)}", shape="ellipse",
                                          style="filled", fillcolor=ARG_COLORS[kind]) + ";")

    # one cluster per scope and direction: backward nodes of fc1 in fc1's cluster would pull
    # the backward pass up into the forward one
    clusters: dict[tuple[str, bool], list[str]] = {}
    edges: list[str] = []
    for j, node in enumerate(graph.nodes):
        label = "\n".join([f"{node.op} {format_attrs(node)}".rstrip(), *map(print_value_type, node.outputs)])
        style = {"tooltip": tip} if (tip := format_comment(node)) else {}
        backward = node.stage != "forward"
        fill = BACKWARD_COLOR if backward else FORWARD_COLOR
        clusters.setdefault((node.scope, backward), []).append(
            f"n{j} " + _attrs(label=label, shape="box", style="filled", fillcolor=fill, **style))
        for i, v in enumerate(node.inputs):
            edges.append(_edge(v, f"n{j}", str(i) if len(node.inputs) > 1 else "", source))
        source.update((v, (f"n{j}", len(node.outputs) > 1)) for v in node.outputs)
    for k, ((scope, backward), stmts) in enumerate(clusters.items()):
        if scope:
            lines.append(f"  subgraph cluster_{k} {{")
            lines.append(f"    label={quote(scope + (' (backward)' if backward else ''))};")
            lines += [f"    {s};" for s in stmts]
            lines.append("  }")
        else:
            lines += [f"  {s};" for s in stmts]

    sink = {"shape": "invhouse", "style": "filled", "fillcolor": SINK_COLOR}
    lines.append("  ret " + _attrs(label="return", **sink) + ";")
    for i, v in enumerate(graph.outputs):
        edges.append(_edge(v, "ret", str(i) if len(graph.outputs) > 1 else "", source))
    for i, (old, new) in enumerate(graph.updates):
        lines.append(f"  u{i} " + _attrs(label=f"update %{old.name}", **sink) + ";")
        edges.append(_edge(new, f"u{i}", "", source))
    lines += [f"  {e};" for e in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _edge(v: Value, target: str, index: str, source: dict[Value, tuple[str, bool]]) -> str:
    origin, several = source[v]
    label = " ".join(filter(None, [index, f"%{v.name}" if several else ""]))
    return f"{origin} -> {target}" + (" " + _attrs(label=label) if label else "")


def to_svg(graph: Graph) -> str | None:
    """The graph drawn by Graphviz as SVG text, or None when ``dot`` is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    return subprocess.run([exe, "-Tsvg"], input=to_dot(graph), capture_output=True, text=True,
                          check=True).stdout
