"""Simplification passes: dead code, common subexpressions, constant folding, algebraic identities.

Every pass copies the graph into a new :class:`GraphBuilder` (the input graph is never edited).
A surviving node keeps its value names and its loc/scope/note; a node replaced by an existing
value disappears and its users, outputs and updates read that value; a node rewritten into a new
one (a matmul with other transpose flags, a composed transpose, a folded constant) keeps the old
node's names and provenance, so printed IR still points at the user's source line.
``simplify`` runs the four to a fixed point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import Graph, GraphBuilder, Node, Value
from gradfuse.ir.registry import get_op
from gradfuse.ir.types import DType

from .manager import Pass, PassResult, register_pass

Changes = list[str]  # one plain-words line per rewrite, in graph order


class _Copy:
    """A graph being rebuilt from ``old``; ``env`` maps each old value to its new counterpart."""

    def __init__(self, old: Graph):
        self.old = old
        self.b = GraphBuilder(old.name)
        self.env: dict[Value, Value] = {v: self.b.arg(v.name, v.type, kind, exact=True) for kind, v in old.args}
        self.producer: dict[Value, Node] = {}

    def operands(self, n: Node) -> list[Value]:
        return [self.env[v] for v in n.inputs]

    def emit(self, n: Node, op: str | None = None, inputs: Sequence[Value] | None = None,
             attrs: dict[str, Any] | None = None) -> None:
        """``n`` with its operands remapped, or (given ``op``) what replaces it: same names, same
        loc/scope/note (and fused kernel)."""
        outs = self.b.emit(op or n.op, self.operands(n) if inputs is None else inputs,
                           n.attrs if attrs is None else attrs, names=[v.name for v in n.outputs],
                           loc=n.loc, scope=n.scope, note=n.note, kernel=n.kernel)
        self.env.update(zip(n.outputs, outs, strict=True))
        self.producer.update((v, self.b.nodes[-1]) for v in outs)

    def alias(self, n: Node, values: Sequence[Value]) -> None:
        """Drop ``n``: whatever used its outputs uses ``values`` instead."""
        for old, new in zip(n.outputs, values, strict=True):
            assert old.type == new.type, f"%{old.name}: {old.type} replaced by %{new.name}: {new.type}"
            self.env[old] = new

    def fill(self, v: Value) -> float | None:
        """The value of ``v`` if a ``const`` node (a fill) defines it."""
        p = self.producer.get(v)
        return p.attrs["value"] if p is not None and p.op == "const" else None

    def finish(self) -> Graph:
        env = self.env
        return self.b.finish([env[v] for v in self.old.outputs], [(env[a], env[b]) for a, b in self.old.updates])


def _label(n: Node) -> str:
    return "%" + n.outputs[0].name


def _report(name: str, changes: Changes, what: str, nothing: str, sep: str = ", ") -> str:
    if not changes:
        return f"{name}: {nothing}"
    return f"{name}: {what.format(n=len(changes), s='' if len(changes) == 1 else 's')}: {sep.join(changes)}"


# ---- dead code ---------------------------------------------------------------------------
def eliminate_dead_code(g: Graph) -> tuple[Graph, Changes]:
    """Keep the nodes that outputs or updates need, transitively; arguments always stay."""
    live = set(g.outputs) | {new for _, new in g.updates}
    needed: set[Node] = set()
    for n in reversed(g.nodes):
        if any(v in live for v in n.outputs):
            needed.add(n)
            live.update(n.inputs)
    dead = [_label(n) for n in g.nodes if n not in needed]
    if not dead:
        return g, []
    c = _Copy(g)
    for n in g.nodes:
        if n in needed:
            c.emit(n)
    return c.finish(), dead


# ---- common subexpressions ---------------------------------------------------------------
_COMMUTATIVE = {"add", "mul"}  # bitwise commutative in IEEE arithmetic, broadcasting is symmetric


def _freeze(x: Any) -> Any:
    """A hashable key that tells apart what compares equal but computes differently (0.0, -0.0)."""
    if isinstance(x, float):
        return ("float", x.hex())
    if isinstance(x, list | tuple):
        return tuple(_freeze(v) for v in x)
    return x


def eliminate_common_subexpressions(g: Graph) -> tuple[Graph, Changes]:
    """Merge nodes computing the same op of the same operands with the same attributes (pure ops:
    dropout is a function of (x, step, seed, stream)); the first one stays."""
    c = _Copy(g)
    seen: dict[tuple, Node] = {}
    merged: Changes = []
    for n in g.nodes:
        inputs = c.operands(n)
        operands = sorted(inputs, key=id) if n.op in _COMMUTATIVE else inputs
        key = (n.op, tuple(id(v) for v in operands), _freeze(sorted(n.attrs.items())))
        first = seen.get(key)
        if first is None:
            seen[key] = n
            c.emit(n)
        else:
            c.alias(n, [c.env[v] for v in first.outputs])
            merged.append(f"{_label(n)} into {_label(first)}")
    return (c.finish(), merged) if merged else (g, [])


# ---- constant folding --------------------------------------------------------------------
def _const_value(result: np.ndarray, dtype: DType) -> float | None:
    """The ``value`` attribute of a const equal to ``result``, or None if no fill equals it."""
    flat = result.reshape(-1)
    first = flat[0] if flat.size else dtype.np.type(0)
    # the shortest decimal that reads back as the same f32 (0.100000024, not 0.10000002384185791)
    value = float(str(first)) if dtype is DType.f32 else float(first)
    with np.errstate(all="ignore"):
        same = np.full(result.shape, value, dtype=dtype.np)
    return value if same.tobytes() == result.tobytes() else None


def _fold(n: Node, inputs: list[Value], c: _Copy, max_elements: int) -> float | None:
    """The constant ``n`` computes, when it computes a fill from fills (or from a shape alone)."""
    if n.op == "const" or len(n.outputs) != 1 or n.output.type.symbols:
        return None
    out = n.output.type
    if n.op == "count":  # reads only its operand's shape
        dims = [inputs[0].type.shape[a] for a in n.attrs["axes"]]
        if any(isinstance(d, str) for d in dims):
            return None
        return _const_value(np.asarray(math.prod(dims), dtype=out.dtype.np), out.dtype)
    fills = [c.fill(v) for v in inputs]
    if not inputs or any(f is None or v.type.symbols for f, v in zip(fills, inputs, strict=True)):
        return None
    if sum(math.prod(v.type.shape) for v in [*inputs, n.output]) > max_elements:
        return None
    try:
        with np.errstate(all="ignore"):
            arrays = [np.full(v.type.shape, f, dtype=v.type.dtype.np) for f, v in zip(fills, inputs, strict=True)]
            (result,) = get_op(n.op).run_ref(arrays, n.attrs)
    except (GradfuseError, ArithmeticError, ValueError):
        return None  # e.g. an index out of range: left for the runtime to report with its message
    result = np.asarray(result)
    assert result.dtype == out.dtype.np and result.shape == out.shape, f"{n.op}: ref disagrees with {out}"
    return _const_value(result, out.dtype)


def fold_constants(g: Graph, max_elements: int = 1 << 16) -> tuple[Graph, Changes]:
    """Evaluate nodes whose operands are all constants (computing in the node's dtype, as the
    interpreter would) and replace those whose result is one repeated value by a ``const``."""
    c = _Copy(g)
    folded: Changes = []
    for n in g.nodes:
        value = _fold(n, c.operands(n), c, max_elements)
        if value is None:
            c.emit(n)
        else:
            t = n.output.type
            c.emit(n, "const", [], {"value": value, "dtype": t.dtype, "shape": t.shape})
            folded.append(f"{_label(n)} = {value!r}")
    return (c.finish(), folded) if folded else (g, [])


# ---- algebraic identities ----------------------------------------------------------------
@dataclass(frozen=True)
class _Rewrite:
    """Replace a node by an existing ``value``, or by a new node ``op(inputs) {attrs}``."""

    why: str
    value: Value | None = None
    op: str | None = None
    inputs: tuple[Value, ...] = ()
    attrs: dict[str, Any] | None = None


Rule = Callable[[Node, list[Value], _Copy], "_Rewrite | None"]

# op -> (operand index, neutral constant, formula): that operand being the constant leaves the other
_NEUTRAL = {
    "add": ((1, 0.0, "x + 0"), (0, 0.0, "0 + x")),
    "sub": ((1, 0.0, "x - 0"),),
    "mul": ((1, 1.0, "x * 1"), (0, 1.0, "1 * x")),
    "div": ((1, 1.0, "x / 1"),),
    "pow": ((1, 1.0, "x ** 1"),),
}


def _neutral_operand(n: Node, ins: list[Value], c: _Copy) -> _Rewrite | None:
    for i, neutral, formula in _NEUTRAL.get(n.op, ()):
        x = ins[1 - i]
        if c.fill(ins[i]) == neutral and x.type == n.output.type:  # a broadcast that adds axes stays
            return _Rewrite(formula, value=x)
    return None


def _producer(c: _Copy, v: Value, op: str) -> Node | None:
    p = c.producer.get(v)
    return p if p is not None and p.op == op else None


def _double_neg(n: Node, ins: list[Value], c: _Copy) -> _Rewrite | None:
    inner = _producer(c, ins[0], "neg") if n.op == "neg" else None
    return _Rewrite("-(-x)", value=inner.inputs[0]) if inner else None


def _transpose(n: Node, ins: list[Value], c: _Copy) -> _Rewrite | None:
    if n.op != "transpose":
        return None
    perm = n.attrs["perm"]
    inner = _producer(c, ins[0], "transpose")
    if inner is not None:  # out[j] = mid[perm[j]] = x[inner_perm[perm[j]]]
        perm = tuple(inner.attrs["perm"][p] for p in perm)
        x = inner.inputs[0]
    else:
        x = ins[0]
    if perm == tuple(range(len(perm))):
        return _Rewrite("identity transpose" if inner is None else "a transpose undone", value=x)
    if inner is not None:
        return _Rewrite(f"two transposes composed into perm=[{','.join(map(str, perm))}]", op="transpose", inputs=(x,),
                        attrs={"perm": perm})
    return None


def _chain(op: str) -> Rule:
    """reshape / broadcast_to: one to the same shape is a no-op; two in a row make one."""

    def rule(n: Node, ins: list[Value], c: _Copy) -> _Rewrite | None:
        if n.op != op:
            return None
        if ins[0].type == n.output.type:
            return _Rewrite(f"{op} to the same shape", value=ins[0])
        inner = _producer(c, ins[0], op)
        if inner is not None:
            return _Rewrite(f"{op} of a {op} made one", op=op, inputs=inner.inputs, attrs=n.attrs)
        return None

    return rule


def _no_op(n: Node, ins: list[Value], c: _Copy) -> _Rewrite | None:
    """Ops whose attributes make them the identity."""
    a = n.attrs
    if n.op == "cast" and a["dtype"] == ins[0].type.dtype:
        return _Rewrite("cast to the same dtype", value=ins[0])
    if n.op == "slice" and (a["start"], a["stop"], a["step"]) == (0, ins[0].type.shape[a["axis"]], 1):
        return _Rewrite("slice of the whole axis", value=ins[0])
    if n.op == "concat" and len(ins) == 1:
        return _Rewrite("concat of one operand", value=ins[0])
    if n.op in ("sum", "mean", "max") and not a["axes"]:
        return _Rewrite(f"{n.op} over no axes", value=ins[0])
    if n.op == "dropout" and a["p"] == 0.0:
        return _Rewrite("dropout with p=0", value=ins[0])
    return None


def _swaps_last_two(node: Node) -> bool:
    perm = node.attrs["perm"]
    r = len(perm)
    return r >= 2 and perm == (*range(r - 2), r - 1, r - 2)


def _matmul_transpose(n: Node, ins: list[Value], c: _Copy) -> _Rewrite | None:
    """matmul(transpose(x) swapping the last two axes, ...) -> matmul(x, ...) with the flag flipped;
    the transpose stays if something else reads it (DCE removes it otherwise)."""
    if n.op != "matmul":
        return None
    inputs, attrs, folded = list(ins), dict(n.attrs), []
    for i, flag in enumerate(("transpose_a", "transpose_b")):
        t = _producer(c, ins[i], "transpose")
        if t is not None and _swaps_last_two(t):
            inputs[i] = t.inputs[0]
            attrs[flag] = not attrs[flag]
            folded.append(f"%{t.outputs[0].name} as {flag}={str(attrs[flag]).lower()}")
    if not folded:
        return None
    return _Rewrite(f"transpose folded into the matmul ({', '.join(folded)})", op="matmul", inputs=tuple(inputs),
                    attrs=attrs)


RULES: tuple[Rule, ...] = (_neutral_operand, _double_neg, _transpose, _chain("reshape"), _chain("broadcast_to"),
                           _no_op, _matmul_transpose)


def apply_algebra(g: Graph) -> tuple[Graph, Changes]:
    """Rewrite algebraic identities (``RULES``), one forward sweep; chains shrink across sweeps."""
    c = _Copy(g)
    done: Changes = []
    for n in g.nodes:
        ins = c.operands(n)
        rewrite = next((r for rule in RULES if (r := rule(n, ins, c)) is not None), None)
        if rewrite is None:
            c.emit(n)
        elif rewrite.value is not None:
            c.alias(n, [rewrite.value])
            done.append(f"{_label(n)} -> %{rewrite.value.name} ({rewrite.why})")
        else:
            c.emit(n, rewrite.op, rewrite.inputs, rewrite.attrs)
            done.append(f"{_label(n)}: {rewrite.why}")
    return (c.finish(), done) if done else (g, [])


# ---- the passes --------------------------------------------------------------------------
def _check_count(name: str, option: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise GradfuseError(f"{name}: {option}={value!r} should be an integer >= {least}")


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes that no output or update depends on."""

    name: ClassVar[str] = "dce"

    def run(self, graph: Graph) -> PassResult:
        g, dead = eliminate_dead_code(graph)
        return PassResult(g, _report("dce", dead, "removed {n} dead node{s}", "no dead nodes"), dead)


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Compute each distinct (op, operands, attributes) once."""

    name: ClassVar[str] = "cse"

    def run(self, graph: Graph) -> PassResult:
        g, merged = eliminate_common_subexpressions(graph)
        return PassResult(g, _report("cse", merged, "merged {n} node{s}", "no duplicate nodes"), merged)


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Replace computations on constants by their (single-valued) result; ``max_elements`` caps
    the size of what is evaluated at compile time."""

    name: ClassVar[str] = "fold-constants"
    max_elements: int = 1 << 16

    def __post_init__(self):
        _check_count(self.name, "max_elements", self.max_elements, 0)

    def run(self, graph: Graph) -> PassResult:
        g, folded = fold_constants(graph, self.max_elements)
        return PassResult(g, _report("fold-constants", folded, "folded {n} node{s} into constants",
                                     "nothing to fold"), folded)


@register_pass
@dataclass(frozen=True)
class Algebra(Pass):
    """Algebraic identities: neutral operands, double negation, transpose/reshape chains, no-op
    casts and broadcasts, transposes folded into matmul flags."""

    name: ClassVar[str] = "algebra"

    def run(self, graph: Graph) -> PassResult:
        g, done = apply_algebra(graph)
        return PassResult(g, _report("algebra", done, "{n} rewrite{s}", "no identities apply", sep="; "), done)


@register_pass
@dataclass(frozen=True)
class Simplify(Pass):
    """fold-constants, algebra, cse and dce in rounds until a round changes nothing."""

    name: ClassVar[str] = "simplify"
    max_rounds: int = 10

    def __post_init__(self):
        _check_count(self.name, "max_rounds", self.max_rounds, 1)

    def run(self, graph: Graph) -> PassResult:
        steps = (FoldConstants(), Algebra(), CommonSubexpressionElimination(), DeadCodeElimination())
        g, rounds, fixed = graph, [], False
        while len(rounds) < self.max_rounds:
            changed = {}
            for p in steps:
                r = p.run(g)
                g = r.graph
                if r.data:
                    changed[p.name] = r.report
            if not changed:
                fixed = True
                break
            rounds.append(changed)
        head = f"simplify: {len(graph.nodes)} -> {len(g.nodes)} nodes"
        if not rounds:
            return PassResult(g, f"{head}: nothing to simplify", rounds)
        head += f" in {len(rounds)} round{'s' if len(rounds) > 1 else ''}"
        head += "" if fixed else f" (stopped at max_rounds={self.max_rounds} before reaching a fixed point)"
        lines = [f"  round {i}: {report}" for i, changed in enumerate(rounds, 1) for report in changed.values()]
        return PassResult(g, "\n".join([head, *lines]), rounds)
