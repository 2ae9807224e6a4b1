"""Kernel bodies as loop nests: the structured half of the kernel IR, printed by every backend.

:mod:`codegen.kernel_ir` groups a fused graph into kernels (an anchor with its prologue and
epilogue loops); this module turns each kernel into statements a backend prints one by one:

- ``For``: loops over one or more index variables; ``independent`` when its iterations may run
  in any order (a backend may parallelise them), with declared ``Reduction``s (combine and
  identity) whose accumulated value the statements after the loop read;
- ``Load`` / ``Store``: an element of a buffer (or a scratch array) at an index, each axis an
  affine ``Ix`` (``var * scale + offset``: transposes, slices, broadcasts, concatenation
  offsets) or indirect (``table[ids[i]]``); a store may accumulate (scatter-add);
- ``Let``: a scalar expression of earlier locals (the ops' lowering templates);
- ``Scratch``: a temporary array (a row being worked on, per-feature statistics);
- ``Gemm``: the one named structured op, which a backend prints with its own GEMM.

The nests come from the op records: elementwise ``expr``, reductions' ``combine``/``identity``,
row ops' :class:`~gradfuse.ir.registry.RowProgram`, and ``lowering["nest"]`` for the other
structured ops, which write their nest with :class:`Builder`.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

from gradfuse.ir.graph import Node, Value
from gradfuse.ir.registry import RowProgram, get_op
from gradfuse.ir.types import DType, dim_factors

from .kernel_ir import CTOR, CodegenError, Kernel, Loop, float_ctor, float_literal, local_name
from .scalar_lib import specialise

NOMINAL_BATCH = 256  # the batch size at which a loop's work is estimated (for parallelising)
SUM = "{a} + {b}"
COMBINE = {"sum": SUM, "max": "max({a}, {b})"}  # the row statistics' combines, by name


# ---- the statements -------------------------------------------------------------------------
@dataclass(frozen=True)
class Ix:
    """One axis of an access: ``var * scale + offset``, or the value of local ``indirect``."""

    var: str | None = None
    scale: int = 1
    offset: int | str = 0
    indirect: str | None = None


@dataclass
class Load:
    local: str
    buf: Value | str  # a kernel buffer, or a scratch array's name
    index: tuple[Ix, ...]


@dataclass
class Let:
    local: str
    expr: str
    node: Node | None = None  # the op it computes (None for the kernel's own arithmetic)


@dataclass
class Store:
    buf: Value | str
    index: tuple[Ix, ...]
    local: str
    add: bool = False  # accumulate into the element (scatter-add) instead of overwriting it


@dataclass
class Reduction:
    acc: str
    combine: str  # a template of the accumulated {a} and the operand {b}: "{a} + {b}" (a sum), ...
    identity: str
    operand: str  # the local combined in at the end of each iteration
    ctor: str  # the accumulator's type (f32, f64, i64...)


@dataclass
class For:
    vars: tuple[str, ...]
    extents: tuple[str, ...]
    body: list = field(default_factory=list)
    reductions: list[Reduction] = field(default_factory=list)
    independent: bool = True  # iterations touch disjoint elements (besides the reductions)
    work: int = 0  # elements the nest touches at the nominal batch size


@dataclass
class Scratch:
    name: str
    shape: tuple[str, ...]
    dtype: DType
    fill: str | None = None


@dataclass
class Gemm:
    node: Node  # the matmul: ``dest = op(a) @ op(b)`` over its operands' buffers


def dim(d) -> str:
    return str(d)


def count(dims) -> str:
    return " * ".join(dim(d) for d in dims) or "1"


def size_of(shape, symbols: dict[str, int] | None = None) -> int:
    symbols = symbols or {}

    def size(d) -> int:
        syms, k = dim_factors(d)
        return k * math.prod(symbols.get(s, NOMINAL_BATCH) for s in syms)

    return math.prod(size(d) for d in shape)


def walk(stmts):
    """Every statement, depth first (loops before their bodies)."""
    for s in stmts:
        yield s
        if isinstance(s, For):
            yield from walk(s.body)


# ---- the builder ----------------------------------------------------------------------------
class Builder:
    """Appends statements to the innermost open loop; what the records' ``nest`` functions use.
    Locals get fresh names; ``F`` is the float constructor of the node being written."""

    def __init__(self, k: Kernel):
        self.k = k
        self.body: list = []
        self._open: list[list] = [self.body]
        self._loops: list[For] = []
        self._names: dict[str, int] = {}
        self.F = "f32"

    dim = staticmethod(dim)
    count = staticmethod(count)

    def fresh(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return f"{base}_{n}" if n else base

    def emit(self, stmt) -> None:
        self._open[-1].append(stmt)

    @contextmanager
    def loop(self, extents, independent: bool = True, names: str = "i", sizes=None):
        """``with b.loop(shape) as ivars:`` a loop nest over ``extents`` (one For); ``sizes``: the
        dims the extents stand for (where they are names, like ``R``), for the work estimate."""
        vars_ = tuple(self.fresh(f"{names}{d}" if len(extents) > 1 or names == "i" else names)
                      for d in range(len(extents)))
        f = For(vars_, tuple(dim(e) for e in extents), independent=independent)
        self.emit(f)  # a loop over () runs its body once
        self._open.append(f.body)
        self._loops.append(f)
        try:
            yield list(vars_)
        finally:
            self._open.pop()
            self._loops.pop()
            inner = [s.work for s in f.body if isinstance(s, For)]
            f.work = size_of(extents if sizes is None else sizes) * max(inner, default=1)

    @staticmethod
    def _ix(i) -> Ix:
        if isinstance(i, Ix):
            return i
        if isinstance(i, int):
            return Ix(offset=i)
        return Ix(var=i)

    def load(self, buf: Value | str, index, name: str | None = None) -> str:
        # not the kernel IR's own names (``v_x``), which the elementwise loops use
        local = self.fresh(name or ("l_" + local_name(buf)[2:] if isinstance(buf, Value) else f"{buf}_"))
        self.emit(Load(local, buf, tuple(map(self._ix, index))))
        return local

    def let(self, expr: str, name: str = "t", node: Node | None = None) -> str:
        local = name if node is not None else self.fresh(name)
        self.emit(Let(local, expr, node))
        return local

    def store(self, buf: Value | str, index, local: str, add: bool = False) -> None:
        self.emit(Store(buf, tuple(map(self._ix, index)), local, add))

    def accumulate(self, combine: str, operand: str, identity: str | None = None, name: str = "acc") -> str:
        """Accumulate ``operand`` over the innermost open loop; the result is readable after it."""
        acc = self.fresh(name)
        if identity is None:
            identity = f"{self.F}(0.0)" if combine == "sum" else f"{self.F}(-np.inf)"
        template = COMBINE.get(combine, combine)
        self._loops[-1].reductions.append(Reduction(acc, template, identity, operand, self.F))
        return acc

    def scratch(self, shape, dtype: DType, fill: str | None = None, name: str = "t") -> str:
        s = self.fresh(name)
        self.emit(Scratch(s, tuple(dim(d) for d in shape), dtype, fill))
        return s

    def fill(self, v: Value, value: str) -> None:
        """Every element of buffer ``v`` set to ``value``."""
        with self.loop(v.type.shape) as i:
            self.store(v, i, self.let(value, "z"))

    def scalar(self, v: Value) -> str:
        """A rank-0 operand: its constant's local, or the local its buffer was read into at entry."""
        assert local_name(v) in self.k.consts or v in self.k.reads and v.type.rank == 0, v
        return local_name(v)

    @staticmethod
    def at(var: str | None, scale: int = 1, offset: int | str = 0) -> Ix:
        return Ix(var, scale, offset)

    @staticmethod
    def via(local: str) -> Ix:
        return Ix(indirect=local)

    def lit(self, x: float) -> str:
        return f"{self.F}({float_literal(x)})"

    def elementwise(self, loop: Loop, ivars: list[str], given: dict[str, str] | None = None) -> None:
        """One element of an elementwise loop of the kernel IR at ``ivars``: its loads, statements
        and stores; ``given`` maps locals computed elsewhere (anchor results) to expressions."""
        if loop.uses_index:
            flat = "0"
            for d, i in zip(loop.space, ivars, strict=True):
                flat = f"({flat}) * {dim(d)} + {i}" if flat != "0" else i
            self.emit(Let("idx", flat))
        for local, expr in (given or {}).items():
            if local != expr:
                self.emit(Let(local, expr))
        for local, access in loop.loads:
            if access.value.type.rank:  # 0-d buffers are read at the kernel's entry
                self.emit(Load(local, access.value, tuple(Ix(offset=0) if a is None else Ix(var=ivars[a])
                                                          for a in access.axes)))
        for s in loop.stmts:
            self.emit(Let(s.local, s.expr, s.node))
        for v, local in loop.stores:
            self.emit(Store(v, broadcast_index(v, loop.space, ivars), local))


def broadcast_index(v: Value, space, ivars: list[str]) -> tuple[Ix, ...]:
    """The index of ``v`` (whose shape broadcasts into ``space``) at loop position ``ivars``."""
    rank = len(space)
    return tuple(Ix(offset=0) if d == 1 and space[rank - v.type.rank + j] != 1 else
                 Ix(var=ivars[rank - v.type.rank + j]) for j, d in enumerate(v.type.shape))


def missing_nest(op) -> str | None:
    """Why no loop nest can be made for ``op`` from its record; None when one can."""
    low = op.lowering
    if op.role in ("view", "immediate", "gemm") or "host" in low:  # host ops: the step calls the runtime
        return None
    if op.role == "elementwise":
        return None if "expr" in low else "no scalar expression (lowering['expr'])"
    if op.role == "reduction":
        return None if {"combine", "identity"} <= set(low) else "no combine and identity"
    if isinstance(low.get("row"), RowProgram) or callable(low.get("nest")):
        return None
    return "no row program (lowering['row']) or loop nest (lowering['nest'])"


# ---- kernels --------------------------------------------------------------------------------
def kernel_body(k: Kernel) -> list:
    """The statements of kernel ``k``: rank-0 reads first (a parallel loop cannot index a 0-d
    array), then the nest of its kind."""
    b = Builder(k)
    for local, expr in k.consts.items():
        b.emit(Let(local, expr))
    for v in k.reads:
        if v.type.rank == 0:
            b.emit(Load(local_name(v), v, ()))
    if k.kind == "elementwise":
        with b.loop(k.epilogue.space) as i:
            b.elementwise(k.epilogue, i)
    elif k.kind == "gemm":
        _gemm(b, k)
    elif k.kind == "reduction":
        _reduction(b, k)
    elif k.kind == "row" and all("row" in get_op(a.op).lowering for a in k.anchors) and _one_pass(k):
        _rows(b, k)
    else:
        _whole_tensor(b, k)
    return b.body


def _gemm(b: Builder, k: Kernel) -> None:
    mm = k.anchors[0]
    out = mm.outputs[0]
    b.emit(Gemm(mm))
    if k.epilogue is not None:
        loop = k.epilogue
        with b.loop(loop.space) as i:
            b.elementwise(loop, i, {local_name(out): b.load(out, broadcast_index(out, loop.space, i), "p")})


def _element(b: Builder, x: Value, prologue: Loop | None, ivars: list[str]) -> str:
    """The local holding ``x[ivars]``: made by the prologue, or loaded."""
    if prologue is not None:
        b.elementwise(prologue, ivars)
        if any(s.node.outputs[0] is x for s in prologue.stmts):
            return local_name(x)
    b.emit(Load(local_name(x), x, tuple(Ix(var=i) for i in ivars)))
    return local_name(x)


def _reduction(b: Builder, k: Kernel) -> None:
    red = k.anchors[0]
    x, y = red.inputs[0], red.outputs[0]
    axes, keepdims = red.attrs.get("axes", ()), red.attrs.get("keepdims", False)
    space = x.type.shape
    b.F = ftype = CTOR[y.type.dtype]
    low = get_op(red.op).lowering  # combine, identity and finish come from the op's record
    combine = low["combine"]
    identity = (f"{ftype}(-np.inf)" if y.type.dtype.is_float else f"{ftype}({_int_min(y.type.dtype)})") \
        if low["identity"] == "lowest" else f"{ftype}({low['identity']})"

    def finish(acc: str) -> str:
        return f"{acc} / {ftype}({count(space[a] for a in axes)})" if low.get("finish") == "mean" else acc

    kept = [i for i in range(len(space)) if i not in axes]
    out_space = tuple(1 if i in axes else space[i] for i in range(len(space))) if keepdims else \
        tuple(space[i] for i in kept)
    if list(axes) == list(range(len(space) - len(axes), len(space))):  # trailing axes: one element at a time
        with b.loop([space[i] for i in kept]) as outer:
            with b.loop([space[a] for a in axes], names="j") as inner:
                acc = b.accumulate(combine, _element(b, x, k.prologue, outer + inner), identity)
            out_ivars = [outer[kept.index(i)] if i in kept else None for i in range(len(space))] if keepdims \
                else outer
            _finish_reduction(b, k, y, out_space, [v or "0" for v in out_ivars], finish(acc))
        return
    # leading axes (bias gradients): accumulate in input order, which reads memory in order
    acc = b.scratch(out_space, y.type.dtype, identity, "acc")
    with b.loop(space, independent=False) as i:
        value = _element(b, x, k.prologue, i)
        oidx = [0 if d in axes else i[d] for d in range(len(space))] if keepdims else [i[d] for d in kept]
        if combine == SUM:
            b.store(acc, oidx, value, add=True)
        else:
            b.store(acc, oidx, b.let(combine.format(a=b.load(acc, oidx), b=value)))
    with b.loop(out_space) as o:
        _finish_reduction(b, k, y, out_space, o, finish(b.load(acc, o)))


def _int_min(dtype: DType) -> int:
    import numpy as np

    return int(np.iinfo(dtype.np).min)


def _finish_reduction(b: Builder, k: Kernel, y: Value, out_space, ivars: list[str], value: str) -> None:
    b.emit(Let(local_name(y), value))
    if k.epilogue is not None:
        b.elementwise(k.epilogue, ivars)
    if y in k.writes:
        b.store(y, broadcast_index(y, out_space, ivars), local_name(y))


# ---- row kernels ----------------------------------------------------------------------------
def _one_pass(k: Kernel) -> bool:
    """One pass per row needs every anchor to read the same tensor along the same axis."""
    x = k.anchors[0].inputs[0]
    axis = get_op(k.anchors[0].op).row_axis(k.anchors[0])
    return all(a.inputs[0] is x and get_op(a.op).row_axis(a) == axis for a in k.anchors) and \
        x.type.rank >= 1 and (k.epilogue is None or k.epilogue.space == x.type.shape)


_NAME = re.compile(r"\{(\w+)\}")
_AT = re.compile(r"\{x@(\w+)\}")


def _rows(b: Builder, k: Kernel) -> None:
    """For each row: a loop per level of statistics (the first also runs the prologue, keeping
    the row it makes in a scratch row, or in the output row when that is the one result), the
    per-row scalars, then one loop for the results and the epilogue; results one per row are
    averaged over the rows (a sum reduction over the row loop)."""
    anchors = k.anchors
    x = anchors[0].inputs[0]
    axis = get_op(anchors[0].op).row_axis(anchors[0])
    lead_dims = [d for i, d in enumerate(x.type.shape) if i != axis]
    b.F = F = float_ctor(anchors[0])
    b.emit(Let("R", count(lead_dims)))
    b.emit(Let("C", dim(x.type.shape[axis])))
    R, C = "R", "C"
    programs: dict[Node, RowProgram] = {a: get_op(a.op).lowering["row"] for a in anchors}
    provided = {name: expr for p in programs.values() for name, expr in p.provides}
    stats: dict[str, object] = {}
    for p in programs.values():
        for s in p.stats:
            if s.name not in provided:
                stats.setdefault(s.name, s)
    level: dict[str, int] = {}
    for name, s in stats.items():
        level[name] = 1 + max([level[r] for r in _NAME.findall(s.element) if r in level], default=-1)
    rowwise = [a for a in anchors if programs[a].result == "row"]
    direct = rowwise[0].outputs[0] if (len(rowwise) == 1 and rowwise[0] is anchors[-1] and k.epilogue is None
                                       and rowwise[0].outputs[0] in k.writes
                                       and rowwise[0].outputs[0].type.dtype == x.type.dtype) else None
    made = k.prologue is not None and any(s.node.outputs[0] is x for s in k.prologue.stmts)

    with b.loop([R], names="r", sizes=lead_dims) as (r,):
        lead, rest = [""] * len(lead_dims), r
        for d in range(len(lead_dims) - 1, -1, -1):  # unravel r into the other indices
            lead[d] = b.let(f"{rest} % {dim(lead_dims[d])}" if d else rest, f"i{d}")
            if d:
                rest = b.let(f"{rest} // {dim(lead_dims[d])}", f"q{d}")

        def at(j) -> list:
            return [*lead[:axis], j, *lead[axis:]]

        row = None  # where later passes read the row from: x itself, or a scratch row
        if made:
            row = direct if direct is not None else b.scratch([x.type.shape[axis]], x.type.dtype, name="t_x")

        def read(j) -> str:
            if row is None:
                return b.load(x, at(j), "xj")
            return b.load(row, at(j) if isinstance(row, Value) else [j], "xj")

        values: dict[str, str] = {"F": F, "C": C, "R": R}
        for lvl in range(max(level.values(), default=-1) + 1):
            with b.loop([C], names="j", sizes=[x.type.shape[axis]]) as (j,):
                if lvl == 0 and k.prologue is not None:
                    xj = _element(b, x, k.prologue, at(j))
                    if row is not None:
                        b.store(row, at(j) if isinstance(row, Value) else [j], xj)
                else:
                    xj = read(j)
                for name, s in stats.items():
                    if level[name] == lvl:
                        element = b.let(_fill(s.element, {**values, "x": xj, "j": j}), name + "_e")
                        values[name] = b.accumulate(s.combine, element, name="row_" + name)
            for name, s in stats.items():
                if level[name] == lvl and s.finish:
                    values[name] = b.let(_fill(s.finish, {**values, "acc": values[name]}), "row_" + name)
        for name, expr in provided.items():
            values[name] = b.let(_fill(expr, values), "row_" + name)
        per_op: dict[Node, dict[str, str]] = {}
        for a in anchors:  # per-row scalars: each op's own names, over the shared statistics
            mine = {**values, **_attrs(a)}
            for name, expr in programs[a].lets:
                mine.update(_operands(b, a, expr, lead, None))
                mine[name] = b.let(_fill(_indirect(expr, mine, read), mine), name)
            per_op[a] = mine
        loss = None
        for a in anchors:
            if programs[a].result == "scalar":
                per_row = b.let(_fill(_indirect(programs[a].out, per_op[a], read), per_op[a]), "row_value")
                loss = (a, b.accumulate("sum", per_row, name="acc_" + local_name(a.outputs[0])[2:]))
        if rowwise or k.epilogue is not None:
            with b.loop([C], names="j", sizes=[x.type.shape[axis]]) as (j,):
                xj = read(j)
                for a in rowwise:
                    v = a.outputs[0]
                    expr = _fill(programs[a].out, {**per_op[a], **_operands(b, a, programs[a].out, lead, j),
                                                   "x": xj, "j": j})
                    b.emit(Let(local_name(v), expr, a))
                    if v in k.writes:
                        b.store(v, at(j), local_name(v))
                if k.epilogue is not None:
                    b.elementwise(k.epilogue, at(j))
    if loss is not None:
        a, acc = loss
        v = a.outputs[0]
        b.emit(Let(local_name(v), f"{acc} / {F}({R})", a))
        if v in k.writes:
            b.store(v, (), local_name(v))
    if k.finale is not None:
        b.elementwise(k.finale, [])


def _fill(template: str, values: dict[str, str]) -> str:
    def sub(m):
        if m.group(1) not in values:
            raise CodegenError(f"row program: no value for {{{m.group(1)}}} in {template!r}")
        return values[m.group(1)]
    return specialise(_NAME.sub(sub, template), values.get("F", "f32"))


def _attrs(n: Node) -> dict[str, str]:
    return {name: (float_literal(v) if isinstance(v, float) else str(v)) for name, v in n.attrs.items()}


def _operands(b: Builder, a: Node, template: str, lead: list[str], j: str | None) -> dict[str, str]:
    """The operands ``template`` names (``in1``, ``in2``...), loaded: a scalar; in a per-row
    scalar, the value of this row (shaped like the rows); in the result, the vector element
    along the row at ``j``."""
    x, out = a.inputs[0], {}
    for name in dict.fromkeys(_NAME.findall(template)):
        if not (name.startswith("in") and name[2:].isdigit()):
            continue
        v = a.inputs[int(name[2:])]
        if v.type.rank == 0:
            out[name] = b.scalar(v)
        elif j is None and v.type.rank == len(lead) == x.type.rank - 1:
            out[name] = b.load(v, lead, name + "_")
        elif j is not None and v.type.rank == 1:
            out[name] = b.load(v, [j], name + "_")
        else:
            raise CodegenError(f"{a.op}: operand {name} {v.type} is neither a scalar, a value per row nor a vector "
                               f"along the row of {x.type}")
    return out


def _indirect(expr: str, values: dict[str, str], read_at) -> str:
    """``{x@name}``: the row at the index held by per-row scalar ``name``, loaded (``read_at``)
    before the expression that reads it."""
    def sub(m):
        key = "at_" + m.group(1)
        if key not in values:
            values[key] = read_at(Ix(indirect=values[m.group(1)]))
        return "{" + key + "}"
    return _AT.sub(sub, expr)


# ---- whole-tensor kernels -------------------------------------------------------------------
def _whole_tensor(b: Builder, k: Kernel) -> None:
    """The prologue into scratch tensors, each anchor's nest over whole tensors (an MSE and its
    gradient share a kernel), then the epilogue and finale loops."""
    if k.kind == "layout" and k.epilogue is not None:  # the epilogue runs where the op stores
        (a,) = k.anchors
        b.F = float_ctor(a)
        start = len(b.body)
        get_op(a.op).lowering["nest"](b, a)
        b.body[start:] = _epilogue_at_stores(b, k, a, b.body[start:])
        return
    inputs = {v for a in k.anchors for v in a.inputs}
    outputs = [v for a in k.anchors for v in a.outputs]
    temps: dict[Value, str] = {}
    if k.prologue is not None:
        for s in k.prologue.stmts:
            v = s.node.outputs[0]
            if v in inputs and v not in k.writes:
                temps[v] = b.scratch(v.type.shape, v.type.dtype, name="t_" + local_name(v)[2:])
        with b.loop(k.prologue.space) as i:
            b.elementwise(k.prologue, i)
            for v, t in temps.items():
                b.store(t, broadcast_index(v, k.prologue.space, i), local_name(v))
    for v in outputs:
        if v not in k.writes:
            temps[v] = b.scratch(v.type.shape, v.type.dtype, name="t_" + local_name(v)[2:])
    for a in k.anchors:
        low = get_op(a.op).lowering
        b.F = float_ctor(a)
        if "row" in low:  # a pass over the rows of its input, which now lies in memory
            sub = Kernel(k.name, "row", [a], k.reads, [v for v in a.outputs], k.consts, [a])
            rb = Builder(sub)
            rb._names = b._names
            _rows(rb, sub)
            b.body.extend(_rebind(rb.body, temps))
            continue
        if "nest" not in low:
            raise CodegenError(f"no loop nest for {a.op} (%{a.outputs[0].name}) in kernel {k.name}")
        start = len(b.body)
        low["nest"](b, a)
        b.body[start:] = _rebind(b.body[start:], temps)
    for loop in (k.epilogue, k.finale):
        if loop is None:
            continue
        with b.loop(loop.space) as i:
            used = {u for s in loop.stmts for u in s.node.inputs}
            b.elementwise(loop, i, {local_name(v): b.load(temps.get(v, v), broadcast_index(v, loop.space, i))
                                    for v in outputs if v in used})


def _epilogue_at_stores(b: Builder, k: Kernel, a: Node, stmts: list) -> list:
    """Each store of ``a``'s output (a layout op's, stored once per element) followed by the
    kernel's epilogue at the stored index; the store stays only where the output is a buffer."""
    v = a.outputs[0]

    def rewrite(body: list) -> list:
        out = []
        for s in body:
            if isinstance(s, For):
                s.body = rewrite(s.body)
            if not (isinstance(s, Store) and s.buf is v):
                out.append(s)
                continue
            out.append(Let(local_name(v), s.local, a))
            sub = Builder(k)
            sub._names = b._names
            sub.elementwise(k.epilogue, [ix_text(i) for i in s.index])
            out.extend(sub.body)
            if v in k.writes:
                out.append(Store(v, s.index, local_name(v)))
        return out
    return rewrite(stmts)


def ix_text(i: Ix) -> str:
    """An index as an expression: ``offset + var * scale``, or the indirect local."""
    if i.indirect is not None:
        return i.indirect
    if i.var is None:
        return str(i.offset)
    term = i.var if i.scale == 1 else f"{i.var} * {i.scale}"
    return term if i.offset in (0, "0") else f"{i.offset} + {term}"


def _rebind(stmts: list, temps: dict[Value, str]) -> list:
    """Accesses of values kept in scratch arrays (not buffers of the kernel) go to the scratch."""
    for s in walk(stmts):
        if isinstance(s, Load | Store) and isinstance(s.buf, Value) and s.buf in temps:
            s.buf = temps[s.buf]
    return stmts


# ---- text -----------------------------------------------------------------------------------
def format_kernel(k: Kernel) -> str:
    """Kernel ``k`` as its loop nests, in a backend-neutral text (``gradfuse show --stage loops``)."""
    ops = ", ".join(dict.fromkeys(n.op for n in k.anchors)) or ", ".join(dict.fromkeys(n.op for n in k.nodes))
    lines = [f"kernel {k.name} ({k.kind}: {ops})  reads {', '.join('%' + v.name for v in k.reads) or '-'}  "
             f"writes {', '.join('%' + v.name for v in k.writes) or '-'}"]

    def buf(b) -> str:
        return "%" + b.name if isinstance(b, Value) else b

    def index(ix) -> str:
        def one(i: Ix) -> str:
            if i.indirect is not None:
                return f"*{i.indirect}"
            term = "" if i.var is None else i.var if i.scale == 1 else f"{i.var}*{i.scale}"
            return term if i.offset in (0, "0") and term else f"{i.offset}+{term}" if term else str(i.offset)
        return "[" + ", ".join(map(one, ix)) + "]"

    def emit(stmts, depth: int) -> None:
        pad = "  " * depth
        for s in stmts:
            if isinstance(s, For):
                head = ", ".join(f"{v} < {e}" for v, e in zip(s.vars, s.extents, strict=True)) or "once"
                red = "".join(f"; {r.acc} = {r.combine.format(a=r.acc, b=r.operand)} from {r.identity}"
                              for r in s.reductions)
                lines.append(f"{pad}for {head}{'' if s.independent else ' (in order)'}{red}:")
                emit(s.body, depth + 1)
            elif isinstance(s, Load):
                lines.append(f"{pad}{s.local} = {buf(s.buf)}{index(s.index)}")
            elif isinstance(s, Store):
                lines.append(f"{pad}{buf(s.buf)}{index(s.index)} {'+=' if s.add else '='} {s.local}")
            elif isinstance(s, Let):
                lines.append(f"{pad}{s.local} = {s.expr}" + (f"    # {s.node.op}" if s.node is not None else ""))
            elif isinstance(s, Scratch):
                lines.append(f"{pad}{s.name} = scratch {s.dtype.value}[{', '.join(s.shape)}]"
                             + (f" filled with {s.fill}" if s.fill else ""))
            elif isinstance(s, Gemm):
                n = s.node
                lines.append(f"{pad}%{n.outputs[0].name} = gemm(%{n.inputs[0].name}{'ᵀ' * n.attrs['transpose_a']}, "
                             f"%{n.inputs[1].name}{'ᵀ' * n.attrs['transpose_b']})")
    if "host" in get_op(k.nodes[0].op).lowering:
        lines.append("  (the step calls the runtime: no kernel)")
    else:
        emit(kernel_body(k), 1)
    return "\n".join(lines)
