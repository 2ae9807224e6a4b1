"""The text form of the graph IR; :mod:`.parser` reads it back (``print(parse(t)) == t``).

```
func @mlp(
    input %x: f32[N,64],
    param %fc1.weight: f32[64,128],
) {
  %fc1.matmul: f32[N,128] = matmul %x, %fc1.weight {transpose_a=false, transpose_b=false}  # @fc1
  %h: f32[N,128] = relu %fc1.matmul                                    # mlp.py:15
  return %h
}
```

Attributes print in the order of the op's ``attrs`` table; a node's note, source location and
scope go in a trailing comment (``# note · file:line @scope``) aligned at column 72.
"""

from __future__ import annotations

import json
from typing import Any

from .graph import Graph, Node, SourceLoc, Value
from .registry import get_op

COMMENT_COLUMN = 72  # 1-based column of the "#" of a node's comment
NOTE_SEP = " · "


def print_value_type(v: Value) -> str:
    return f"%{v.name}: {v.type}"


def format_attr(kind: str, value: Any) -> str:
    """One attribute value, printed according to its :class:`~.registry.Attr` kind."""
    if kind == "float?" and value is None:
        return "none"
    if kind in ("float", "float?"):
        return repr(float(value))
    if kind == "bool":
        return "true" if value else "false"
    if kind == "str":
        return json.dumps(value)
    if kind in ("ints", "dims"):
        return "[" + ",".join(str(v) for v in value) + "]"
    if kind in ("int", "dtype"):
        return str(value)
    raise AssertionError(f"unknown attribute kind {kind}")


def format_attrs(node: Node) -> str:
    """``{k=v, ...}`` in the op's declared order, or ``""`` for a node without attributes."""
    if not node.attrs:
        return ""
    spec = get_op(node.op).attrs
    parts = [f"{k}={format_attr(a.kind, node.attrs[k])}" for k, a in spec.items() if k in node.attrs]
    return "{" + ", ".join(parts) + "}"


def format_where(loc: SourceLoc | None, scope: str) -> str:
    """``file:line @scope``, either part optional; ``""`` when there is neither."""
    where = str(loc) if loc else ""
    if scope:
        where = f"{where} @{scope}" if where else f"@{scope}"
    return where


def format_comment(node: Node) -> str:
    """The trailing comment text of a node (without ``# ``), ``""`` if it has none.

    Line breaks become spaces: a comment has to stay on its line for the text to parse back.
    """
    parts = [node.note] if node.note else []
    where = format_where(node.loc, node.scope)
    if where:
        parts.append(where)
    return NOTE_SEP.join(parts).replace("\r", " ").replace("\n", " ")


def print_node(node: Node) -> str:
    code = "  " + ", ".join(map(print_value_type, node.outputs)) + f" = {node.op}"
    if node.inputs:
        code += " " + ", ".join(f"%{v.name}" for v in node.inputs)
    attrs = format_attrs(node)
    if attrs:
        code += " " + attrs
    comment = format_comment(node)
    if not comment:
        return code
    return code + " " * max(2, COMMENT_COLUMN - 1 - len(code)) + "# " + comment


def print_graph(graph: Graph) -> str:
    if graph.args:
        lines = [f"func @{graph.name}("]
        lines += [f"    {kind.value} {print_value_type(v)}," for kind, v in graph.args]
        lines.append(") {")
    else:
        lines = [f"func @{graph.name}() {{"]
    lines += [print_node(n) for n in graph.nodes]
    lines.append("  return" + "".join(f"{',' if i else ''} %{v.name}" for i, v in enumerate(graph.outputs)))
    lines += [f"  update %{old.name} <- %{new.name}" for old, new in graph.updates]
    lines.append("}")
    return "\n".join(lines) + "\n"
