"""The graph IR: values, nodes and graphs in SSA form.

Immutable by convention: passes build new graphs (with :class:`GraphBuilder`) rather than
editing old ones. Values are compared by identity; their names are unique within a graph.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .types import DType, TensorType

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")
# How provenance notes start (written by passes/autodiff.py and passes/optimizer.py).
BACKWARD_NOTES = ("vjp(", "accumulate:", "dL/dL", "the loss does not depend", "allreduce")
UPDATE_NOTES = ("sgd", "adam")


@dataclass(eq=False)
class Value:
    """An SSA value: defined once (as a graph argument or a node output), used anywhere after."""

    name: str
    type: TensorType

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class ArgKind(enum.Enum):
    """What a graph argument is: data fed per call, a trained parameter, or carried state."""

    input = "input"
    param = "param"
    state = "state"


@dataclass(frozen=True)
class SourceLoc:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(eq=False)
class Node:
    """One op application. ``scope`` is the DSL layer path (``fc1``, ``blocks.0.norm``);
    ``note`` says where a generated node came from (e.g. the VJP rule that emitted it);
    ``kernel`` names the fused kernel it belongs to, once fusion has run."""

    op: str
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    loc: SourceLoc | None = None
    scope: str = ""
    note: str | None = None
    kernel: str | None = None  # the fused kernel this node runs in (set by the fusion pass)

    @property
    def stage(self) -> str:
        """``forward``, ``backward`` (emitted by autodiff) or ``update`` (by an optimizer), read
        off the provenance note that those passes write."""
        note = self.note or ""
        if note.startswith(BACKWARD_NOTES):
            return "backward"
        if note.startswith(UPDATE_NOTES):
            return "update"
        return "forward"

    @property
    def output(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]


@dataclass(eq=False)
class Graph:
    """A function: arguments (inputs, params, state), nodes in execution order, outputs, and
    ``updates``: new values for param and state arguments (a training step's new weights,
    BatchNorm running statistics, optimizer moments), applied after the outputs are computed."""

    name: str
    args: list[tuple[ArgKind, Value]]
    nodes: list[Node]
    outputs: list[Value]
    updates: list[tuple[Value, Value]] = field(default_factory=list)

    def args_of(self, kind: ArgKind) -> list[Value]:
        return [v for k, v in self.args if k is kind]

    @property
    def inputs(self) -> list[Value]:
        return self.args_of(ArgKind.input)

    @property
    def params(self) -> list[Value]:
        return self.args_of(ArgKind.param)

    @property
    def state(self) -> list[Value]:
        return self.args_of(ArgKind.state)

    def values(self) -> Iterable[Value]:
        for _, v in self.args:
            yield v
        for n in self.nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(name)

    def producers(self) -> dict[Value, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {v: [] for v in self.values()}
        for n in self.nodes:
            for v in dict.fromkeys(n.inputs):
                out[v].append(n)
        return out

    def __str__(self) -> str:
        from .printer import print_graph

        return print_graph(self)


def _scalar_key(value: float, dtype) -> tuple[float, DType]:
    """(the value as ``dtype`` holds it, dtype): values that round to the same constant share it."""
    dtype = DType.of(dtype)
    return (float(dtype.np.type(value)) if dtype.is_float else float(value)), dtype


def _scalar_text(value: float, dtype: DType) -> str:
    """The shortest decimal that reads back as ``value`` in ``dtype`` (numpy's shortest repr)."""
    if not dtype.is_float or value == 0:  # -0.0 too: it shares the constant 0.0
        return str(int(value)) if value.is_integer() else repr(value)
    return str(dtype.np.type(value)).removesuffix(".0")


class GraphBuilder:
    """Builds a graph node by node, checking each op's shape rule as it goes.

    Used by the tracer, by parsers and by passes, so that every graph is made the same way.
    """

    def __init__(self, name: str):
        self.name = name
        self.args: list[tuple[ArgKind, Value]] = []
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._scalars: dict[tuple, Value] = {}

    @classmethod
    def extend(cls, g: Graph, name: str | None = None) -> GraphBuilder:
        """A builder that starts with ``g``'s arguments and nodes (sharing their values)."""
        b = cls(name or g.name)
        for kind, v in g.args:
            b.args.append((kind, v))
            b._claim(v.name)
        for n in g.nodes:
            b.add_node(n)
        return b

    def add_node(self, n: Node) -> None:
        """Append an existing node (its values keep their names)."""
        self.nodes.append(n)
        for v in n.outputs:
            self._claim(v.name)
        if n.op == "const" and n.attrs["shape"] == () and n.note is None:  # not e.g. the autodiff seed
            self._scalars.setdefault(_scalar_key(n.attrs["value"], n.attrs["dtype"]), n.outputs[0])

    def scalar(self, value: float, dtype) -> Value:
        """A scalar constant, emitted once per graph and value (in its dtype) and shared by every
        use; named by the shortest decimal that gives the value in that dtype (``%c0``, ``%c0.5``,
        ``%c0.1`` for float32 1 - 0.9), with the dtype added where another dtype took the name."""
        key = _scalar_key(value, dtype)
        if key not in self._scalars:
            text = _scalar_text(key[0], key[1]).replace("-", "neg").replace("+", "")
            hint = f"c{text}" if NAME_RE.match(f"c{text}") else "c"
            if hint in self._names:  # e.g. %c1 in f32 and %c1.f64
                hint = f"{hint}.{key[1]}"
            (self._scalars[key],) = self.emit("const", [], {"value": float(value), "dtype": dtype, "shape": ()},
                                              hint=hint)
        return self._scalars[key]

    def fresh_name(self, hint: str) -> str:
        """``hint`` if unused, else ``hint.1``, ``hint.2``, ..."""
        if hint not in self._names:
            return hint
        i = 1
        while f"{hint}.{i}" in self._names:
            i += 1
        return f"{hint}.{i}"

    def _claim(self, name: str) -> str:
        assert name not in self._names, f"duplicate value name {name}"
        assert NAME_RE.match(name), f"bad value name {name!r}"
        self._names.add(name)
        return name

    def arg(self, name: str, type: TensorType, kind: ArgKind = ArgKind.input, *, exact: bool = False) -> Value:
        v = Value(self._claim(name if exact else self.fresh_name(name)), type)
        self.args.append((kind, v))
        return v

    def rename(self, value: Value, hint: str, fresh: bool = False) -> None:
        """Give ``value`` a better name (e.g. the layer that produced it): ``hint`` if it is
        free, else (with ``fresh``) ``hint.1``, ``hint.2``, ..., else keep the old name."""
        if value.name == hint or (hint in self._names and not fresh):
            return
        self._names.discard(value.name)
        value.name = self._claim(self.fresh_name(hint))

    def emit(self, op: str, inputs: Sequence[Value], attrs: dict[str, Any] | None = None, *,
             names: Sequence[str] | None = None, hint: str | None = None, loc: SourceLoc | None = None,
             scope: str = "", note: str | None = None, types: Sequence[TensorType] | None = None,
             kernel: str | None = None) -> tuple[Value, ...]:
        """Append ``op(inputs)``; returns its output values.

        Output types come from the op's shape rule (which raises ShapeError on bad operands).
        ``names`` fixes the output names exactly (parser); otherwise ``hint`` is made unique.
        ``types``, when given, must equal the inferred types (parser, verifier).
        """
        from .registry import get_op

        opdef = get_op(op)
        attrs = opdef.normalize_attrs(attrs or {})
        inferred = opdef.infer_types([v.type for v in inputs], attrs)
        if types is not None and tuple(types) != inferred:
            got = ", ".join(map(str, types))
            want = ", ".join(map(str, inferred))
            from gradfuse.errors import VerifyError

            raise VerifyError(f"{op}: declared result type {got} but its operands give {want}")
        if names is not None:
            assert len(names) == len(inferred)
            out_names = [self._claim(n) for n in names]
        else:
            # secondary results are named after the layer: %bn.running_mean.1 is the new running mean
            hints = [hint or (f"{scope}.{op}" if scope else op)]
            hints += [f"{scope or op}.{name}" for name in opdef.output_names[1:]]
            out_names = [self._claim(self.fresh_name(h)) for h in hints]
        outs = tuple(Value(n, t) for n, t in zip(out_names, inferred, strict=True))
        self.nodes.append(Node(op, tuple(inputs), outs, attrs, loc, scope, note, kernel))
        return outs

    def emit1(self, op: str, *inputs: Value, **kw) -> Value:
        (out,) = self.emit(op, inputs, kw.pop("attrs", None), **kw)
        return out

    def finish(self, outputs: Sequence[Value], updates: Sequence[tuple[Value, Value]] = (),
               verify: bool = True) -> Graph:
        g = Graph(self.name, list(self.args), list(self.nodes), list(outputs), list(updates))
        if verify:
            from .verifier import verify as _verify

            _verify(g)
        return g
