"""Hypothesis strategies for random valid graphs, shared by the text-IR and pass tests.

``graphs()`` builds graphs with :class:`GraphBuilder` the way the tracer does: f32 inputs with a
batch dimension (symbolic ``N`` or a small int), params (some created for matmuls as a layer
would), optional state with an update, a chain of nodes over earlier values, several outputs.
Only ops present in the registry are used, and a node whose operands its shape rule rejects
is skipped, so every graph drawn passes the verifier.
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


def random_feeds(g: Graph, batch: int = 3, seed: int = 0) -> dict:
    """Random arrays for every argument of ``g``, with each symbol bound to ``batch``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for _, v in g.args:
        shape = v.type.concrete({s: batch for s in v.type.symbols})
        feeds[v.name] = rng.normal(size=shape).astype(v.type.dtype.np) if v.type.dtype.is_float else \
            rng.integers(0, 2, size=shape).astype(v.type.dtype.np)
    return feeds
