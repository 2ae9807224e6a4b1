"""Hypothesis strategies for random valid graphs, shared by the text-IR and pass tests.

``graphs()`` builds graphs with :class:`GraphBuilder` the way the tracer does: f32 inputs with a
batch dimension (symbolic ``N`` or a small int), params (some created for matmuls as a layer
would), optional state with an update, a chain of nodes over earlier values, several outputs.
Only ops present in the registry are used, and a node whose operands its shape rule rejects
is skipped, so every graph drawn passes the verifier.

``mixed_graphs()`` draws bigger graphs (up to 20 nodes) over every fusion role, two batch
symbols (``N`` and ``T``), boolean masks, i64 ids and +-inf/NaN constants, for the tests that
compile fused graphs; :func:`random_feeds` feeds both kinds (one size per symbol, ids in range).
"""

from __future__ import annotations

import contextlib
import math

from hypothesis import strategies as st

from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import ArgKind, Graph, GraphBuilder, SourceLoc, Value
from gradfuse.ir.registry import REQUIRED, OpDef, all_ops
from gradfuse.ir.types import DType, Shape, TensorType

DEFAULT_OPS = ("add", "sub", "mul", "div", "maximum", "minimum", "neg", "abs", "exp", "tanh", "relu",
               "sigmoid", "leaky_relu", "sum", "mean", "max", "matmul", "const", "reshape", "transpose")

names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,7}", fullmatch=True)
features = st.integers(1, 4)
small_floats = st.floats(-3, 3, allow_nan=False, width=32)


def f32(*shape) -> TensorType:
    return TensorType(DType.f32, shape)


def broadcastable(a: Shape, b: Shape) -> bool:
    return all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b), strict=False))


def _reshapes(shape: Shape) -> list[Shape]:
    """Targets with the same element count: add or drop unit axes, flatten all but the first."""
    out = [(*shape, 1), tuple(d for d in shape if d != 1)]
    if len(shape) >= 2 and all(isinstance(d, int) for d in shape[1:]):
        out.append((shape[0], math.prod(shape[1:])))
    if all(isinstance(d, int) for d in shape):
        out.append((math.prod(shape),))
    return out


@st.composite
def _attrs(draw, opdef: OpDef, x: Value | None) -> dict:
    """Attributes for ``opdef`` applied to ``x`` (its first operand), drawn by attribute kind;
    attributes with a default are sometimes left out."""
    rank = x.type.rank if x is not None else 0
    attrs = {}
    for name, spec in opdef.attrs.items():
        if spec.default is not REQUIRED and draw(st.booleans()):
            continue
        if spec.kind == "bool":
            value = draw(st.booleans())
        elif spec.kind in ("float", "float?"):
            value = draw(small_floats)
        elif spec.kind == "int":
            value = draw(st.integers(0, max(rank - 1, 0)))
        elif spec.kind == "dtype":
            value = DType.f32
        elif spec.kind == "ints" and opdef.kind == "shape":
            value = draw(st.permutations(range(rank)))
        elif spec.kind == "ints":
            value = sorted(draw(st.sets(st.integers(0, rank - 1), min_size=1))) if rank else []
        elif spec.kind == "dims" and x is not None:
            value = draw(st.sampled_from(_reshapes(x.type.shape)))
        elif spec.kind == "dims":
            value = draw(st.lists(features, max_size=2))
        else:  # str: no op of the default set takes one; keep its default
            continue
        attrs[name] = value
    return attrs


@st.composite
def _annotations(draw) -> dict:
    """Source location, scope and note as the tracer and autodiff would attach them."""
    loc = draw(st.none() | st.builds(SourceLoc, st.sampled_from(["model.py", "nets/mlp.py"]),
                                     st.integers(1, 999)))
    scope = draw(st.sampled_from(["", "fc1", "blocks.0.norm"]))
    note = draw(st.none() | st.sampled_from(["vjp(relu) of %h: g*(x>0)", "vjp(matmul) wrt rhs"]) | st.text())
    return {"loc": loc, "scope": scope, "note": note}


@st.composite
def graphs(draw, ops=DEFAULT_OPS, max_nodes: int = 8, annotate: bool = True) -> Graph:
    """A random verified graph over the registered ops among ``ops``; values are all f32."""
    registry = all_ops()
    available = [registry[op] for op in ops if op in registry]
    assert available, f"none of {ops} is registered"
    elementwise = [o for o in available if o.kind == "elementwise" and o.arity in (1, 2)]
    b = GraphBuilder(draw(names))
    batch = draw(st.sampled_from(["N", 1, 2, 3]))
    values: list[Value] = []
    for _ in range(draw(st.integers(1, 3))):
        shape = (batch, *draw(st.lists(features, max_size=2)))
        values.append(b.arg(draw(names), f32(*shape), ArgKind.input))
    for _ in range(draw(st.integers(0, 2))):
        values.append(b.arg(draw(names), f32(*draw(st.lists(features, min_size=1, max_size=2))),
                            ArgKind.param))
    state = None
    if elementwise and draw(st.booleans()):
        state = b.arg(draw(names), f32(draw(features)), ArgKind.state)
        values.append(state)

    results: list[Value] = []
    for _ in range(draw(st.integers(1, max_nodes))):
        opdef = draw(st.sampled_from(available))
        x = draw(st.sampled_from(values))
        if opdef.arity == 0:
            inputs = []
        elif opdef.name == "matmul":
            if x.type.rank < 2:
                continue
            n = draw(features)
            w = f32(x.type.shape[-1], n)
            same = [v for v in values if v.type == w]
            y = draw(st.sampled_from(same)) if same and draw(st.booleans()) else b.arg(draw(names), w, ArgKind.param)
            inputs = [x, y]
        elif opdef.arity == 2:
            inputs = [x, draw(st.sampled_from([v for v in values if broadcastable(x.type.shape, v.type.shape)]))]
        elif opdef.arity == 1:
            inputs = [x]
        else:
            continue
        attrs = {} if opdef.name == "matmul" else draw(_attrs(opdef, inputs[0] if inputs else None))
        extra = draw(_annotations()) if annotate else {}
        try:
            outs = b.emit(opdef.name, inputs, attrs, hint=draw(st.none() | names), **extra)
        except GradfuseError:
            continue
        values += [v for v in outs if v.type.dtype is DType.f32]
        results += outs

    updates = []
    if state is not None:
        opdef = draw(st.sampled_from(elementwise))
        with contextlib.suppress(GradfuseError):  # an op of ``ops`` may take no f32
            new = b.emit(opdef.name, [state] * opdef.arity, draw(_attrs(opdef, state)))[0]
            if new.type == state.type:
                updates.append((state, new))
    outputs = draw(st.lists(st.sampled_from(results or values), min_size=1, max_size=3, unique=True))
    return b.finish(outputs, updates)


def index_bounds(g: Graph) -> dict[Value, int]:
    """For each integer argument that indexes a table (the ops' IndexCheck records: ids, labels),
    the number of entries of its smallest table."""
    from gradfuse.ir.registry import IndexCheck, get_op

    bounds: dict[Value, int] = {}
    for n in g.nodes:
        for check in get_op(n.op).checks:
            size = check.size(n) if isinstance(check, IndexCheck) else None
            if isinstance(size, int):  # (classes along a symbolic axis are not drawn here)
                v = n.inputs[check.operand]
                bounds[v] = min(bounds.get(v, size), size)
    return bounds


def random_feeds(g: Graph, batch: int = 3, seed: int = 0, sizes: dict[str, int] | None = None) -> dict:
    """Random arrays for every argument of ``g``, with each symbol bound to ``sizes[symbol]``
    (``batch`` for the symbols ``sizes`` leaves out); integers that index a table lie in its
    range (else in [0, 2), as booleans)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bind = {**{s: batch for _, v in g.args for s in v.type.symbols}, **(sizes or {})}
    bounds = index_bounds(g)
    feeds = {}
    for _, v in g.args:
        shape = v.type.concrete(bind)
        if v.type.dtype.is_float:
            feeds[v.name] = rng.normal(size=shape).astype(v.type.dtype.np)
        else:
            feeds[v.name] = rng.integers(0, bounds.get(v, 2), size=shape).astype(v.type.dtype.np)
    return feeds


# ---- mixed graphs: every fusion role, several batch symbols, non-finite constants -----------
SYMBOLS = ("N", "T")
# scalar constants, the non-finite ones among them: they reach kernels as literals (immediates)
SPECIAL = (math.inf, -math.inf, math.nan, 0.0, 1.0, -1.0, 0.5, 2.0, -3.0)
UNARY = ("exp", "neg", "abs", "tanh", "relu", "sigmoid", "leaky_relu", "sqrt", "log", "rsqrt", "erf", "gelu")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum", "pow")
COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
# what a node of the mixed graph does, with the weight it is drawn with
KINDS = {"binary": 6, "unary": 4, "compare": 3, "where": 3, "logic": 1, "cast": 1, "reduce": 3, "count": 1,
         "row": 3, "layer_norm": 1, "slice": 2, "concat": 2, "broadcast_to": 1, "embedding": 1, "matmul": 2,
         "const": 1, "reshape": 1, "transpose": 1}


class _Mixer:
    """The values a mixed graph has so far, by dtype, and how to draw each kind of node over them."""

    def __init__(self, draw, b: GraphBuilder, symbols):
        self.draw, self.b, self.symbols = draw, b, tuple(symbols)
        self.floats: list[Value] = []
        self.bools: list[Value] = []
        self.ids: list[Value] = []  # i64 inputs that index tables (feeds keep them in range)
        self.results: list[Value] = []
        self.last: Value | None = None

    # -- shapes and operands ----------------------------------------------------------------
    def dim(self, symbols=None):
        symbols = self.symbols if symbols is None else symbols
        return self.draw(st.sampled_from(symbols) if symbols and self.draw(st.booleans()) else st.integers(1, 4))

    def bound(self) -> tuple[str, ...]:
        """The symbols an argument's shape binds (the only ones a value may use)."""
        return tuple(sorted({s for _, v in self.b.args for s in v.type.symbols}))

    def input_shape(self, symbol: str | None = None) -> Shape:
        """A batch-like leading axis (``symbol``, else any symbol or a size), then 0-2 features."""
        lead = self.draw(st.sampled_from([symbol, "size"])) if symbol else self.dim()
        lead = self.draw(st.integers(1, 4)) if lead == "size" else lead
        return (lead, *self.draw(st.lists(st.integers(1, 4), max_size=2)))

    def arg(self, hint: str, t: TensorType, kind: ArgKind = ArgKind.param) -> Value:
        v = self.b.arg(hint, t, kind)
        if t.dtype is DType.f32:
            self.floats.append(v)
        return v

    def pick(self, pool: list[Value] | None = None) -> Value:
        """Most often the newest value (chains, which fusion joins), else any."""
        pool = self.floats if pool is None else pool
        if pool is self.floats and self.last is not None and self.draw(st.booleans()):
            return self.last
        return self.draw(st.sampled_from(pool))

    def scalar(self) -> Value:
        value = self.draw(st.sampled_from(SPECIAL) | small_floats)
        return self.b.scalar(value, DType.f32)

    def partner(self, x: Value) -> Value:
        """An operand that broadcasts with ``x``: an earlier value, a scalar constant (+-inf and
        NaN among them), a new param of a shape broadcast against x, or x itself."""
        how = self.draw(st.sampled_from(["value", "scalar", "param", "self"]))
        if how == "value":
            same = [v for v in self.floats if broadcastable(x.type.shape, v.type.shape)]
            return self.draw(st.sampled_from(same))
        if how == "scalar":
            return self.scalar()
        if how == "param":
            shape = x.type.shape[self.draw(st.integers(0, x.type.rank)):]
            shape = tuple(1 if isinstance(d, str) or self.draw(st.booleans()) else d for d in shape)
            return self.arg("p", f32(*shape))
        return x

    def axes(self, x: Value) -> list[int]:
        return sorted(self.draw(st.sets(st.integers(0, x.type.rank - 1), max_size=x.type.rank))) if x.type.rank else []

    def emit(self, op: str, inputs: list[Value], attrs: dict | None = None) -> tuple[Value, ...]:
        outs = self.b.emit(op, inputs, attrs or {})
        for v in outs:
            (self.floats if v.type.dtype is DType.f32 else self.bools if v.type.dtype is DType.bool else []).append(v)
        self.results += outs
        if outs[0].type.dtype is DType.f32:
            self.last = outs[0]
        return outs

    # -- one node of each kind ----------------------------------------------------------------
    def node(self, kind: str) -> None:
        draw = self.draw
        x = self.pick()
        if kind == "unary":
            op = draw(st.sampled_from(UNARY))
            attrs = {"alpha": draw(small_floats)} if op == "leaky_relu" else \
                {"approximate": draw(st.sampled_from(["none", "tanh"]))} if op == "gelu" else {}
            self.emit(op, [x], attrs)
        elif kind == "binary":
            y = self.partner(x)
            self.emit(draw(st.sampled_from(BINARY)), [y, x] if draw(st.booleans()) else [x, y])
        elif kind == "compare":
            self.emit(draw(st.sampled_from(COMPARE)), [x, self.partner(x)])
        elif kind == "where":
            if not self.bools:
                return
            c = self.pick(self.bools)
            a = self.partner(c) if draw(st.booleans()) else x
            self.emit("where", [c, a, self.partner(a)] if draw(st.booleans()) else [c, self.partner(a), a])
        elif kind == "logic":
            if not self.bools:
                return
            c = self.pick(self.bools)
            if draw(st.booleans()):
                self.emit("logical_not", [c])
            else:
                self.emit(draw(st.sampled_from(["logical_and", "logical_or"])), [c, self.pick(self.bools)])
        elif kind == "cast":
            if self.bools and draw(st.booleans()):
                self.emit("cast", [self.pick(self.bools)], {"dtype": DType.f32})
            elif self.ids:
                self.emit("cast", [draw(st.sampled_from(self.ids))], {"dtype": DType.f32})
        elif kind == "reduce":
            self.emit(draw(st.sampled_from(["sum", "mean", "max"])), [x],
                      {"axes": self.axes(x), "keepdims": draw(st.booleans())})
        elif kind == "count":  # the number of elements over axes: an immediate, N x T at run time
            n = self.b.emit("count", [x], {"axes": self.axes(x)})[0]
            self.emit(draw(st.sampled_from(["div", "mul", "sub"])), [x, n])
        elif kind == "row":
            if x.type.rank:
                self.emit(draw(st.sampled_from(["softmax", "log_softmax"])), [x],
                          {"axis": draw(st.integers(0, x.type.rank - 1))})
        elif kind == "layer_norm":
            if x.type.rank and isinstance(x.type.shape[-1], int):
                d = x.type.shape[-1]
                self.emit("layer_norm", [x, self.arg("gamma", f32(d)), self.arg("beta", f32(d))],
                          {"eps": draw(st.sampled_from([1e-5, 1e-3, 0.1]))})
        elif kind == "slice":
            fixed = [i for i, d in enumerate(x.type.shape) if isinstance(d, int)]
            if fixed:
                axis = draw(st.sampled_from(fixed))
                size = x.type.shape[axis]
                start = draw(st.integers(0, size))
                stop = draw(st.integers(start, size))
                self.emit("slice", [x], {"axis": axis, "start": start, "stop": stop, "step": draw(st.integers(1, 3))})
        elif kind == "concat":
            fixed = [i for i, d in enumerate(x.type.shape) if isinstance(d, int)]
            if fixed:
                axis = draw(st.sampled_from(fixed))
                like = [v for v in self.floats if v.type.rank == x.type.rank and all(
                    a == b for i, (a, b) in enumerate(zip(v.type.shape, x.type.shape, strict=True)) if i != axis)]
                others = draw(st.lists(st.sampled_from(like), min_size=1, max_size=2))
                self.emit("concat", [x, *others] if draw(st.booleans()) else [*others, x], {"axis": axis})
        elif kind == "broadcast_to":
            lead = draw(st.lists(st.sampled_from((*self.bound(), 2)), max_size=1))
            shape = [*lead, *(self.dim(self.bound()) if d == 1 and draw(st.booleans()) else d for d in x.type.shape)]
            self.emit("broadcast_to", [x], {"shape": shape})
        elif kind == "embedding":
            if not self.ids or draw(st.booleans()):
                self.ids.append(self.b.arg("ids", TensorType(DType.i64, self.input_shape()[:2]), ArgKind.input))
            ids = draw(st.sampled_from(self.ids))
            table = self.arg("table", f32(draw(st.integers(1, 5)), draw(st.integers(1, 4))))
            self.emit("embedding", [table, ids])
        elif kind == "matmul":
            if x.type.rank < 2:
                return
            ta = draw(st.booleans())
            k = x.type.shape[-2] if ta else x.type.shape[-1]
            tb = draw(st.booleans())
            fits = [v for v in self.floats if v.type.rank >= 2 and v.type.shape[-1 if tb else -2] == k]
            if fits and draw(st.booleans()):
                y = draw(st.sampled_from(fits))
            else:
                n = draw(features)
                y = self.arg("w", f32(n, k) if tb else f32(k, n))
            self.emit("matmul", [x, y], {"transpose_a": ta, "transpose_b": tb})
        elif kind == "const":
            shape = draw(st.sampled_from([x.type.shape, x.type.shape[1:], ()]))
            value = draw(st.sampled_from(SPECIAL) | small_floats)
            self.emit("const", [], {"value": value, "shape": shape})
        elif kind == "reshape":
            self.emit("reshape", [x], {"shape": draw(st.sampled_from(_reshapes(x.type.shape)))})
        elif kind == "transpose":
            self.emit("transpose", [x], {"perm": draw(st.permutations(range(x.type.rank)))})
        else:
            raise AssertionError(kind)


@st.composite
def mixed_graphs(draw, max_nodes: int = 20, symbols=SYMBOLS) -> Graph:
    """A random verified graph mixing elementwise ops (broadcasts, comparisons, ``where``),
    reductions, row ops (softmax / log_softmax along any axis, layer_norm), slices, concat,
    broadcast_to, embedding, matmul and scalar constants (+inf, -inf and NaN among them), over
    inputs with batch symbols ``symbols`` (f32[N,3] and f32[T,4] side by side) and i64 ids;
    optional state and param updates. Feed it with :func:`random_feeds` (``sizes``: one size per
    symbol; ids within their tables). A node whose shape rule rejects its operands is skipped."""
    kinds = [k for k, w in KINDS.items() for _ in range(w)]
    m = _Mixer(draw, GraphBuilder(draw(names)), symbols)
    for i in range(draw(st.integers(1, 3))):  # inputs over N, over T, over either
        m.arg("x", f32(*m.input_shape(symbols[i] if i < len(symbols) else None)), ArgKind.input)
    for _ in range(draw(st.integers(0, 2))):
        m.arg("p", f32(*draw(st.lists(features, min_size=1, max_size=2))))
    if draw(st.booleans()):
        m.arg("s", f32(draw(features)), ArgKind.state)
    target = draw(st.sampled_from(range(max_nodes, 0, -1)))  # big graphs first, smaller ones too
    for _ in range(3 * target):  # a node whose operands its shape rule rejects is skipped
        if len(m.b.nodes) >= target:
            break
        with contextlib.suppress(GradfuseError):
            m.node(draw(st.sampled_from(kinds)))

    updates = []
    updatable = [v for k, v in m.b.args if k is not ArgKind.input and v.type.dtype is DType.f32]
    for arg in draw(st.lists(st.sampled_from(updatable), max_size=2, unique=True)) if updatable else []:
        same = [v for v in m.results if v.type == arg.type]
        if same and draw(st.booleans()):
            new = draw(st.sampled_from(same))
        else:
            try:
                new = m.emit(draw(st.sampled_from(BINARY)), [arg, m.partner(arg)])[0]
            except GradfuseError:
                continue
            if new.type != arg.type:
                continue
        updates.append((arg, new))
    values = m.results or [v for _, v in m.b.args]
    outputs = draw(st.lists(st.sampled_from(values), min_size=1, max_size=4, unique=True))
    arg = draw(st.sampled_from([v for _, v in m.b.args]))
    if draw(st.integers(0, 9)) == 0 and arg not in outputs:  # an argument returned as it came in
        outputs.append(arg)
    return m.b.finish(outputs, updates)



def run_both(g: Graph, prog, feeds: dict):
    """(the interpreter's result, the compiled program's outputs, the arguments after its in-place
    updates), from the same feeds."""
    import numpy as np

    from gradfuse.ir.interpreter import interpret

    with np.errstate(divide="ignore", invalid="ignore"):
        ref = interpret(g, {k: np.copy(v) for k, v in feeds.items()})
    args = {k: np.copy(v) for k, v in feeds.items()}
    return ref, prog.run(args), args
