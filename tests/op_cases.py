"""Sample operands for every registered op: the table behind the op-table tests.

``CASES[op]`` is a list of :class:`OpCase` ``(types, attrs, gen)``: the operand types (which may
hold the symbolic batch dimension ``N``), the attributes as a user would write them, and
optionally an input generator for ops whose operands must lie in a domain (positive inputs for
``log``, labels in range for ``softmax_cross_entropy``, ...). The same table serves the shape
tests (infer vs ref), the VJP tests and the kernel tests (kernel vs ref).

    from op_cases import CASES, make_inputs, bindings_for, build_graph
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from gradfuse.ir.graph import Graph, GraphBuilder
from gradfuse.ir.types import TensorType, as_type

# gen(rng, types, shapes) -> one array per operand, of exactly that dtype and (concrete) shape.
Gen = Callable[[np.random.Generator, list[TensorType], list[tuple[int, ...]]], list[np.ndarray]]

SYMBOL_SIZES = (1, 3)  # each case with a symbol runs once per size, bound to every symbol


class OpCase(NamedTuple):
    types: list[TensorType]
    attrs: dict[str, Any]
    gen: Gen | None = None


def case(*types: str | TensorType, gen: Gen | None = None, **attrs) -> OpCase:
    return OpCase([as_type(t) for t in types], attrs, gen)


# ---- input generators ------------------------------------------------------------------------
def default_array(rng: np.random.Generator, t: TensorType, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal floats, small signed ints, fair booleans."""
    if t.dtype.is_float:
        a = rng.standard_normal(shape)
    elif t.dtype.is_int:
        a = rng.integers(-5, 6, size=shape)
    else:
        a = rng.random(shape) < 0.5
    return np.asarray(a).astype(t.dtype.np)


def positive_array(rng, t, shape):
    return np.asarray(rng.uniform(0.5, 2.0, size=shape)).astype(t.dtype.np)


def nonzero_array(rng, t, shape):
    """Magnitudes in [0.5, 2) with random signs: safe denominators."""
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return np.asarray(sign * rng.uniform(0.5, 2.0, size=shape)).astype(t.dtype.np)


def per_operand(*fills) -> Gen:
    """A generator using ``fills[i](rng, type, shape)`` for operand ``i`` (``None``: the default)."""

    def gen(rng, types, shapes):
        return [(fill or default_array)(rng, t, s) for fill, t, s in zip(fills, types, shapes, strict=True)]

    return gen


def _all_positive(rng, types, shapes):
    return [positive_array(rng, t, s) for t, s in zip(types, shapes, strict=True)]


def _labels(rng, types, shapes):
    """Logits, integer labels in [0, classes), then any further operand (a cotangent) as default."""
    (lt, yt, *rest), (ls, ys, *rest_shapes) = types, shapes
    return [default_array(rng, lt, ls), np.asarray(rng.integers(0, ls[-1], size=ys)).astype(yt.dtype.np),
            *(default_array(rng, t, s) for t, s in zip(rest, rest_shapes, strict=True))]


def _ids(rng, types, shapes):
    """An embedding table, then integer ids in [0, rows)."""
    (tt, it), (ts, is_) = types, shapes
    return [default_array(rng, tt, ts), np.asarray(rng.integers(0, ts[0], size=is_)).astype(it.dtype.np)]


def _ids_below(rows: int) -> Gen:
    """Integer ids in [0, rows) (embedding_grad: the table size is an attribute), then the rest."""

    def gen(rng, types, shapes):
        ids = np.asarray(rng.integers(0, rows, size=shapes[0])).astype(types[0].dtype.np)
        return [ids, *(default_array(rng, t, s) for t, s in zip(types[1:], shapes[1:], strict=True))]

    return gen


def _step(rng, t, shape):
    return np.asarray(rng.integers(0, 1000, size=shape)).astype(t.dtype.np)


_norm_stats = per_operand(None, None, None, None, positive_array)  # x, gamma, beta, mean, var > 0


def distinct_array(rng, t, shape):
    """Values 0.1 apart in random order: every pooling window has one maximal element, well
    clear of the next (finite differences never cross a tie)."""
    size = int(np.prod(shape, dtype=np.int64))
    return (rng.permutation(size).reshape(shape) * 0.1 - 0.05 * size).astype(t.dtype.np)


def ties_array(rng, t, shape):
    """Small integers: pooling windows full of tied maxima (not differentiable there)."""
    return np.asarray(rng.integers(0, 3, size=shape)).astype(t.dtype.np)


def _ties(rng, types, shapes):
    return per_operand(ties_array)(rng, types, shapes)


_ties.ties = True  # test_vjp leaves these out: the maximum is not differentiable at a tie


# ---- the table -------------------------------------------------------------------------------
_BROADCASTING = [
    case("f32[N,4]", "f32[4]"),
    case("f64[2,3]", "f64[2,3]"),
    case("f32[]", "f32[N,3]"),
    case("i32[N,1]", "i32[1,5]"),
    case("i64[2,1,3]", "i64[4,1]"),
]
_FLOAT_BROADCASTING = [
    case("f32[N,4]", "f32[4]"),
    case("f64[2,1,3]", "f64[4,1]"),
    case("f32[]", "f32[N,3]"),
]
_COMPARISON = [
    case("f32[N,4]", "f32[4]"),
    case("i64[3]", "i64[]"),
    case("f64[N,2]", "f64[N,2]"),
]
_LOGICAL = [case("bool[N,4]", "bool[4]"), case("bool[]", "bool[2,3]")]
_UNARY_NUMERIC = [case("f32[N,4]"), case("i32[3]"), case("f64[]")]
_UNARY_FLOAT = [case("f32[N,4]"), case("f64[2,3,2]"), case("f32[]")]
_UNARY_POSITIVE = [case(*c.types, gen=_all_positive) for c in _UNARY_FLOAT]


def _reduction_cases(ints: bool) -> list[OpCase]:
    out = [
        case("f32[N,4,5]", axes=[1]),
        case("f32[N,4,5]", axes=[0, 2], keepdims=True),
        case("f64[N,3]", axes=[0, 1]),
        case("f32[2,3]", axes=[]),
        case("f32[]", axes=[]),
    ]
    if ints:
        out.append(case("i32[N,3]", axes=[0]))
    return out


_SOFTMAX = [
    case("f32[N,10]", axis=1),
    case("f64[N,5]", axis=0),
    case("f32[2,N,4]", axis=2),
    case("f32[3]", axis=0),
]
_BATCH_NORM = ["f32[N,2,6]", "f32[6]", "f32[6]", "f32[6]", "f32[6]"]  # >= 2 rows per feature even at N=1
_BATCH_NORM_3D = ["f64[N,3,4]", "f64[4]", "f64[4]", "f64[4]", "f64[4]"]

CASES: dict[str, list[OpCase]] = {
    # elementwise arithmetic (numpy broadcasting)
    "add": _BROADCASTING,
    "sub": _BROADCASTING,
    "mul": _BROADCASTING,
    "div": [case(*c.types, gen=per_operand(None, nonzero_array)) for c in _FLOAT_BROADCASTING],
    "pow": [case(*c.types, gen=per_operand(positive_array, None)) for c in _FLOAT_BROADCASTING],
    "maximum": _BROADCASTING,
    "minimum": _BROADCASTING,
    # comparisons and logic
    "eq": _COMPARISON,
    "ne": _COMPARISON,
    "lt": _COMPARISON,
    "le": _COMPARISON,
    "gt": _COMPARISON,
    "ge": _COMPARISON,
    "logical_and": _LOGICAL,
    "logical_or": _LOGICAL,
    "logical_not": [case("bool[N,3]"), case("bool[]")],
    "where": [
        case("bool[N,4]", "f32[N,4]", "f32[]"),
        case("bool[4]", "i32[N,1]", "i32[1,4]"),
        case("bool[]", "f64[2]", "f64[2]"),
    ],
    # unary math and activations
    "neg": _UNARY_NUMERIC,
    "abs": _UNARY_NUMERIC,
    "exp": _UNARY_FLOAT,
    "log": _UNARY_POSITIVE,
    "sqrt": _UNARY_POSITIVE,
    "rsqrt": _UNARY_POSITIVE,
    "tanh": _UNARY_FLOAT,
    "erf": _UNARY_FLOAT,
    "sigmoid": _UNARY_FLOAT,
    "relu": _UNARY_FLOAT,
    "leaky_relu": [case("f32[N,4]"), case("f64[2,3]", alpha=0.2), case("f32[]", alpha=0)],
    # f32 tanh is its own helper (fast_exp inlined): NaN at -inf as numpy, found by the mixed graphs
    "gelu": [case("f32[N,4]"), case("f64[2,3]", approximate="tanh"), case("f32[]", approximate="none"),
             case("f32[N,3]", approximate="tanh")],
    "gelu_grad": [case("f32[N,4]", "f32[N,4]"), case("f64[2,3]", "f64[2,3]", approximate="tanh")],
    # casts and constants
    "cast": [
        case("f32[N,3]", dtype="i32"),
        case("i64[4]", dtype="f32"),
        case("bool[N]", dtype="f64"),
        case("f64[2,2]", dtype="bool"),
        case("i32[]", dtype="i64"),
    ],
    "const": [
        case(value=1.5),
        case(value=2.0, dtype="f64", shape=["N", 3]),
        case(value=-3, dtype="i32", shape=[2, 2]),
        case(value=1, dtype="bool", shape=[3]),
        # non-finite values, a scalar literal and a filled tensor (an attention mask's -inf)
        case(value=float("-inf")),
        case(value=float("inf"), dtype="f64", shape=["N", 2]),
        case(value=float("nan"), shape=[3]),
    ],
    "causal_mask": [case(shape=[1, 1]), case(shape=[5, 5]), case(shape=[3, 4]), case(shape=["N", "N"])],
    # linear algebra
    "matmul": [
        case("f32[N,4]", "f32[4,5]"),
        case("f32[N,4]", "f32[5,4]", transpose_b=True),
        case("f32[N,4]", "f32[N,5]", transpose_a=True),
        case("f32[2,4,3]", "f32[2,5,4]", transpose_a=True, transpose_b=True),
        case("f64[2,1,3,4]", "f64[5,4,2]"),
        case("f32[N,2,3]", "f32[3,4]"),
    ],
    # composite NN ops
    "softmax": _SOFTMAX,
    "log_softmax": _SOFTMAX,
    "softmax_cross_entropy": [
        case("f32[N,10]", "i64[N]", gen=_labels),
        case("f64[2,3,5]", "i32[2,3]", gen=_labels),
        case("f32[7]", "i64[]", gen=_labels),
    ],
    "softmax_cross_entropy_grad": [
        case("f32[N,10]", "i64[N]", "f32[]", gen=_labels),
        case("f64[2,3,5]", "i32[2,3]", "f64[]", gen=_labels),
    ],
    "mse": [case("f32[N,4]", "f32[N,4]"), case("f64[]", "f64[]"), case("f32[2,N,3]", "f32[2,N,3]")],
    "mse_grad": [case("f32[N,4]", "f32[N,4]", "f32[]"), case("f64[]", "f64[]", "f64[]")],
    "layer_norm": [
        case("f32[N,8]", "f32[8]", "f32[8]"),
        case("f64[2,N,4]", "f64[4]", "f64[4]", eps=1e-3),
        case("f32[5]", "f32[5]", "f32[5]"),
    ],
    "layer_norm_grad": [
        case("f32[N,8]", "f32[8]", "f32[N,8]"),
        case("f64[2,N,4]", "f64[4]", "f64[2,N,4]", eps=1e-3),
    ],
    "batch_norm_train": [
        case(*_BATCH_NORM, gen=_norm_stats),
        case(*_BATCH_NORM_3D, gen=_norm_stats, momentum=0.2, eps=1e-3),
    ],
    "batch_norm_train_grad": [
        case("f32[N,6]", "f32[6]", "f32[N,6]"),
        case("f64[N,3,4]", "f64[4]", "f64[N,3,4]", eps=1e-3),
    ],
    "batch_norm_infer": [
        case(*_BATCH_NORM, gen=_norm_stats),
        case(*_BATCH_NORM_3D, gen=_norm_stats, eps=1e-3),
    ],
    "embedding": [
        case("f32[10,4]", "i64[N]", gen=_ids),
        case("f64[7,3]", "i32[N,5]", gen=_ids),
        case("f32[5,2]", "i64[]", gen=_ids),
    ],
    "embedding_grad": [
        case("i64[N]", "f32[N,4]", gen=_ids_below(10), rows=10),
        case("i32[N,5]", "f64[N,5,3]", gen=_ids_below(7), rows=7),
        case("i64[]", "f32[2]", gen=_ids_below(5), rows=5),
    ],
    "dropout": [
        case("f32[N,16]", "i64[]", gen=per_operand(None, _step), p=0.5, seed=1, stream=0),
        case("f64[3,4]", "i64[]", gen=per_operand(None, _step), p=0.0, seed=0, stream=3),
        case("f32[]", "i64[]", gen=per_operand(None, _step), p=0.9, seed=-7, stream=2),
    ],
    "allreduce": [
        case("f32[N,4]", bucket=0, ranks=2),
        case("f64[3,5]", bucket=1, ranks=3),
        case("f32[]", bucket=2, ranks=1),
    ],
    # reductions
    "sum": _reduction_cases(ints=True),
    "mean": _reduction_cases(ints=False),
    "max": _reduction_cases(ints=True),
    "count": [case("f32[N,4]", axes=[0]), case("f64[2,N,4]", axes=[1, 2]), case("f32[3]", axes=[])],
    # images (NCHW): stride, padding, dilation and groups; max-pool ties
    "conv2d": [
        case("f32[N,3,5,6]", "f32[4,3,3,3]"),
        case("f32[N,4,7,6]", "f32[6,2,3,3]", stride=[2, 2], padding=[1, 1], groups=2),
        case("f64[N,2,6,6]", "f64[4,1,2,2]", dilation=[2, 2], groups=2, padding=[1, 0]),
        case("f32[2,2,5,5]", "f32[2,2,1,1]", stride=[2, 1]),
    ],
    "conv2d_grad_input": [
        case("f32[N,4,3,4]", "f32[4,3,3,3]", size=[5, 6]),
        case("f32[N,6,4,3]", "f32[6,2,3,3]", stride=[2, 2], padding=[1, 1], groups=2, size=[7, 6]),
        case("f64[N,4,6,4]", "f64[4,1,2,2]", dilation=[2, 2], groups=2, padding=[1, 0], size=[6, 6]),
    ],
    "conv2d_grad_weight": [
        case("f32[N,3,5,6]", "f32[N,4,3,4]", kernel=[3, 3]),
        case("f32[N,4,7,6]", "f32[N,6,4,3]", stride=[2, 2], padding=[1, 1], groups=2, kernel=[3, 3]),
        case("f64[N,2,6,6]", "f64[N,4,6,4]", dilation=[2, 2], groups=2, padding=[1, 0], kernel=[2, 2]),
    ],
    "im2col": [
        case("f32[N,3,5,6]", kernel=[3, 3]),
        case("f64[N,2,7,6]", kernel=[3, 2], stride=[2, 2], padding=[1, 1], dilation=[1, 2]),
    ],
    "col2im": [
        case("f32[N,12,27]", kernel=[3, 3], size=[3, 5, 6]),
        case("f64[N,12,12]", kernel=[3, 2], stride=[2, 2], padding=[1, 1], dilation=[1, 2], size=[2, 7, 6]),
        case("f32[N,30,8]", kernel=[2, 2], padding=[1, 1], dilation=[2, 2], size=[2, 5, 6]),
    ],
    "max_pool2d": [
        case("f32[N,3,6,6]", gen=per_operand(distinct_array), kernel=[2, 2], stride=[2, 2]),
        case("f64[N,2,5,7]", gen=per_operand(distinct_array), kernel=[3, 3], stride=[2, 1], padding=[1, 1]),
        case("f32[N,2,6,6]", gen=_ties, kernel=[3, 3], stride=[1, 1], padding=[1, 1]),
    ],
    "max_pool2d_grad": [
        case("f32[N,3,6,6]", "f32[N,3,3,3]", kernel=[2, 2], stride=[2, 2]),
        case("f32[N,2,5,5]", "f32[N,2,2,2]", kernel=[2, 2], stride=[2, 2]),
        case("f32[N,2,6,6]", "f32[N,2,3,3]", gen=per_operand(ties_array, None), kernel=[2, 2], stride=[2, 2]),
        case("f64[N,2,5,7]", "f64[N,2,3,7]", kernel=[3, 3], stride=[2, 1], padding=[1, 1]),
        case("f32[N,2,6,6]", "f32[N,2,6,6]", gen=per_operand(ties_array, None), kernel=[3, 3], stride=[1, 1],
             padding=[1, 1]),
    ],
    "avg_pool2d": [
        case("f32[N,3,6,6]", kernel=[2, 2], stride=[2, 2]),
        case("f64[N,2,5,7]", kernel=[3, 3], stride=[2, 1], padding=[1, 1]),
        case("f32[N,2,5,5]", kernel=[3, 3], stride=[2, 2], padding=[1, 1], count_include_pad=False),
    ],
    "avg_pool2d_grad": [
        case("f32[N,3,3,3]", kernel=[2, 2], stride=[2, 2], size=[6, 6]),
        case("f64[N,2,3,7]", kernel=[3, 3], stride=[2, 1], padding=[1, 1], size=[5, 7]),
        case("f32[N,2,3,3]", kernel=[3, 3], stride=[2, 2], padding=[1, 1], count_include_pad=False, size=[5, 5]),
    ],
    # data movement
    "reshape": [
        case("f32[N,4]", shape=["N", 2, 2]),
        case("f32[2,3,4]", shape=[6, 4]),
        case("f32[N,2,3]", shape=[6, "N"]),
        case("i64[4]", shape=[2, 1, 2]),
        case("f32[1]", shape=[]),
    ],
    "transpose": [
        case("f32[N,3]", perm=[1, 0]),
        case("f64[2,3,4]", perm=[2, 0, 1]),
        case("bool[N,2,3]", perm=[0, 1, 2]),
    ],
    "broadcast_to": [
        case("f32[4]", shape=["N", 4]),
        case("f32[N,1]", shape=["N", 3]),
        case("i64[]", shape=[2, 3]),
        case("f64[1,N,1]", shape=[2, "N", 5]),
    ],
    "slice": [
        case("f32[N,10]", axis=1, start=2, stop=8, step=3),
        case("f32[5,N]", axis=0, start=1, stop=5),
        case("i32[6]", axis=0, start=3, stop=3),
    ],
    "slice_grad": [
        case("f32[N,2]", axis=1, start=2, stop=8, step=3, size=10),
        case("f64[4,N]", axis=0, start=1, stop=5, size=5),
        case("i32[0]", axis=0, start=3, stop=3, size=6),
    ],
    "concat": [
        case("f32[N,3]", "f32[N,5]", axis=1),
        case("i64[2]", "i64[3]", "i64[1]", axis=0),
        case("bool[N,2]", axis=1),
        case("f64[2,N]", "f64[1,N]", axis=0),
    ],
}


# ---- helpers ---------------------------------------------------------------------------------
def case_symbols(c: OpCase) -> set[str]:
    """Symbols in the operand types and in any shape-like attribute."""
    syms = set().union(*(t.symbols for t in c.types))
    for v in c.attrs.values():
        if isinstance(v, list | tuple):
            syms |= {d for d in v if isinstance(d, str)}
    return syms


def bindings_for(c: OpCase) -> list[dict[str, int]]:
    """The symbol bindings a case runs under: each size of SYMBOL_SIZES, or none."""
    syms = sorted(case_symbols(c))
    return [dict.fromkeys(syms, n) for n in SYMBOL_SIZES] if syms else [{}]


def make_inputs(c: OpCase, bindings: Mapping[str, int] | None = None,
                rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """One array per operand of ``c``, with symbols bound by ``bindings``."""
    rng = rng if rng is not None else np.random.default_rng(0)
    shapes = [t.concrete(dict(bindings or {})) for t in c.types]
    arrays = (c.gen or per_operand(*[None] * len(c.types)))(rng, list(c.types), shapes)
    for a, t, s in zip(arrays, c.types, shapes, strict=True):
        assert a.dtype == t.dtype.np and a.shape == s, f"generator gave {a.dtype}{list(a.shape)} for {t}"
    return arrays


def build_graph(op: str, c: OpCase) -> Graph:
    """A one-node graph ``@op_case`` applying ``op`` to arguments ``%x0, %x1, ...``.

    Symbols used only in attributes (``const`` of shape ``[N,3]``) get a dummy ``f32[sym]``
    argument named ``%_sym`` so that they are bound when the graph runs.
    """
    b = GraphBuilder(f"{op}_case")
    args = [b.arg(f"x{i}", t, exact=True) for i, t in enumerate(c.types)]
    typed = set().union(*(t.symbols for t in c.types))
    for s in sorted(case_symbols(c) - typed):
        b.arg(f"_{s}", TensorType("f32", (s,)), exact=True)
    outs = b.emit(op, args, c.attrs)
    return b.finish(list(outs))


def feeds_for(g: Graph, c: OpCase, bindings: Mapping[str, int] | None = None,
              rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Inputs for :func:`build_graph`'s graph, dummy symbol arguments included."""
    arrays = make_inputs(c, bindings, rng)
    feeds = {f"x{i}": a for i, a in enumerate(arrays)}
    for _, v in g.args:
        if v.name not in feeds:
            feeds[v.name] = np.zeros(v.type.concrete(dict(bindings or {})), dtype=v.type.dtype.np)
    return feeds


# ---- non-finite inputs: the variant of every float case -------------------------------------
NONFINITE = (np.inf, -np.inf, np.nan)


def has_float_operand(c: OpCase) -> bool:
    return any(t.dtype.is_float for t in c.types)


def with_nonfinite(arrays: list[np.ndarray], rng: np.random.Generator, shift: int = 0) -> list[np.ndarray]:
    """Copies of ``arrays`` with a few elements of every float array replaced by +inf, -inf and
    NaN (all three where it has 3 elements or more; a smaller one gets the first of them after
    rotating by ``shift``, so that the cases of an op between them see each)."""
    out = []
    for j, a in enumerate(arrays):
        a = a.copy()
        if a.dtype.kind == "f" and a.size:
            at = rng.choice(a.size, size=min(3, a.size), replace=False)
            values = NONFINITE[(shift + j) % 3:] + NONFINITE[:(shift + j) % 3]
            a.reshape(-1)[at] = values[:len(at)]
        out.append(a)
    return out


# ---- a confident model's logits (cross-entropy accuracy) -------------------------------------
CONFIDENT = [(loss, top) for loss in (1e-4, 1e-5, 1e-6, 1e-7) for top in (5.0, 30.0)]  # (row loss, top logit)


def confident_logits(rng: np.random.Generator, rows: int, classes: int, loss: float,
                     top: float) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits whose every row has a cross-entropy near ``loss`` (the label's logit ahead of
    standard normal others by log((classes - 1) / loss)) and its largest logit at ``top``; labels."""
    labels = rng.integers(0, classes, rows)
    z = rng.standard_normal((rows, classes))
    z[np.arange(rows), labels] = np.log((classes - 1) / loss)
    z += top - z[np.arange(rows), labels][:, None]
    return z.astype(np.float32), labels


def cross_entropy_f64(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log softmax(logits)[label] in float64 as log1p(Σ_{j≠label} e^(z_j - z_label)), which
    keeps a tiny loss to float64 precision (no max subtracted: for |z| well below 700)."""
    z = logits.astype(np.float64)
    gap = z - np.take_along_axis(z, labels[:, None], axis=1)
    others = np.arange(z.shape[1]) != labels[:, None]
    return float(np.log1p(np.where(others, np.exp(gap), 0.0).sum(axis=1)).mean())
