"""The functional layer of the DSL: operators with Python scalars and tensors, indexing,
reshapes and reductions, against numpy."""

from __future__ import annotations

import os

import numpy as np
import numpy_reference as ref
import pytest
from dsl_helpers import BATCHES, TOL, Fn, randn, trace_fn

import gradfuse as gf
from gradfuse import functional as F
from gradfuse.errors import ShapeError

HERE = os.path.basename(__file__)


# ==== 5. the functional layer ==================================================================
def grid(shape, seed=0) -> np.ndarray:
    """Values in {0.5, 1.0, 1.5, 2.0}: safe for / and **, and equal often enough for ==."""
    return (np.random.default_rng(seed).integers(1, 5, shape) / 2).astype(np.float32)


SCALAR_CASES = [
    ("x + 2", lambda x: x + 2, lambda x: x + 2),
    ("2 + x", lambda x: 2 + x, lambda x: 2 + x),
    ("x - 0.5", lambda x: x - 0.5, lambda x: x - 0.5),
    ("0.5 - x", lambda x: 0.5 - x, lambda x: 0.5 - x),
    ("x * 3", lambda x: x * 3, lambda x: x * 3),
    ("3.0 * x", lambda x: 3.0 * x, lambda x: 3.0 * x),
    ("x / 4", lambda x: x / 4, lambda x: x / 4),
    ("4 / x", lambda x: 4 / x, lambda x: 4 / x),
    ("x ** 2", lambda x: x**2, lambda x: x**2),
    ("2 ** x", lambda x: 2**x, lambda x: 2.0**x),
    ("x ** 0.5", lambda x: x**0.5, np.sqrt),
    ("-x", lambda x: -x, lambda x: -x),
    ("abs(1 - x)", lambda x: abs(1 - x), lambda x: np.abs(1 - x)),
    ("x > 1", lambda x: x > 1, lambda x: x > 1),
    ("1 < x", lambda x: 1 < x, lambda x: 1 < x),
    ("x <= 1.5", lambda x: x <= 1.5, lambda x: x <= 1.5),
    ("1.5 >= x", lambda x: 1.5 >= x, lambda x: 1.5 >= x),
    ("x == 1", lambda x: x == 1, lambda x: x == 1),
    ("x != 1", lambda x: x != 1, lambda x: x != 1),
    ("x.exp()", lambda x: x.exp(), np.exp),
    ("x.log()", lambda x: x.log(), np.log),
    ("x.sqrt()", lambda x: x.sqrt(), np.sqrt),
    ("x.tanh()", lambda x: x.tanh(), np.tanh),
    ("x.sigmoid()", lambda x: x.sigmoid(), ref.sigmoid),
    ("(x - 1).relu()", lambda x: (x - 1).relu(), lambda x: ref.relu(x - 1)),
    ("F.maximum(x, 1)", lambda x: F.maximum(x, 1), lambda x: np.maximum(x, 1)),
    ("F.minimum(1, x)", lambda x: F.minimum(1, x), lambda x: np.minimum(1, x)),
    ("where(x > 1, x, 0)", lambda x: F.where(x > 1, x, 0.0), lambda x: np.where(x > 1, x, 0)),
    ("where(x > 1, 1, -1)", lambda x: F.where(x > 1, 1.0, -1.0), lambda x: np.where(x > 1, 1.0, -1.0)),
]


@pytest.mark.parametrize("text, fn, expected", SCALAR_CASES, ids=[c[0] for c in SCALAR_CASES])
def test_operators_with_python_scalars(text, fn, expected):
    g = trace_fn(fn, x="f32[N,4]")
    for n in BATCHES:
        x = grid((n, 4), seed=n)
        got = gf.interpret(g, {"x": x}).outputs[0]
        want = expected(x.astype(np.float64))
        assert got.shape == (n, 4)
        if want.dtype == np.bool_:
            assert got.dtype == np.bool_ and str(g.outputs[0].type) == "bool[N,4]"
            np.testing.assert_array_equal(got, want)
        else:
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, **TOL)


def test_scalars_take_the_tensor_dtype():
    g = trace_fn(lambda x: 2 * x + 1, x="f64[N,2]")
    assert str(g.outputs[0].type) == "f64[N,2]"
    assert all(str(n.output.type) == "f64[]" for n in g.nodes if n.op == "const")
    g = trace_fn(lambda i: i * 2 + 1, i="i64[N]")
    out = gf.interpret(g, {"i": np.array([1, 2, 3])}).outputs[0]
    np.testing.assert_array_equal(out, [3, 5, 7])
    assert out.dtype == np.int64


TENSOR_CASES = [
    ("x + y", lambda x, y, w, b: x + y, lambda x, y, w, b: x + y),
    ("x * b (broadcast)", lambda x, y, w, b: x * b, lambda x, y, w, b: x * b),
    ("b - x (broadcast)", lambda x, y, w, b: b - x, lambda x, y, w, b: b - x),
    ("x / y", lambda x, y, w, b: x / y, lambda x, y, w, b: x / y),
    ("x ** y", lambda x, y, w, b: x**y, lambda x, y, w, b: x**y),
    ("x @ w", lambda x, y, w, b: x @ w, lambda x, y, w, b: x @ w),
    ("linear", lambda x, y, w, b: F.linear(x, w, w[0]), lambda x, y, w, b: x @ w + w[0]),
    ("x @ y.T", lambda x, y, w, b: x @ y.T, lambda x, y, w, b: x @ y.T),
    ("x @ y.transpose()", lambda x, y, w, b: x @ y.transpose(), lambda x, y, w, b: x @ y.T),
    ("matmul transpose_b", lambda x, y, w, b: F.matmul(x, y, transpose_b=True), lambda x, y, w, b: x @ y.T),
    ("matmul transpose_a", lambda x, y, w, b: F.matmul(w, w, transpose_a=True), lambda x, y, w, b: w.T @ w),
    ("where(x > y, x, y)", lambda x, y, w, b: F.where(x > y, x, y), lambda x, y, w, b: np.maximum(x, y)),
    ("concat axis -1", lambda x, y, w, b: F.concat([x, y, x], axis=-1),
     lambda x, y, w, b: np.concatenate([x, y, x], 1)),
    ("concat axis 0", lambda x, y, w, b: F.concat([w, w[:1]], axis=0),
     lambda x, y, w, b: np.concatenate([w, w[:1]], 0)),
    ("concat axis 1", lambda x, y, w, b: F.concat([w, b.reshape(4, 1)], axis=1),
     lambda x, y, w, b: np.concatenate([w, b[:, None]], 1)),
    ("astype f64", lambda x, y, w, b: x.astype("f64") * 2.0, lambda x, y, w, b: x.astype(np.float64) * 2),
    ("cast i32", lambda x, y, w, b: F.cast(x * 1.9, np.int32),
     lambda x, y, w, b: (x * np.float32(1.9)).astype(np.int32)),
    ("bool logic", lambda x, y, w, b: F.logical_or(x > 1, F.logical_not(y > 1)),
     lambda x, y, w, b: (x > 1) | ~(y > 1)),
]


@pytest.mark.parametrize("text, fn, expected", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_operators_between_tensors(text, fn, expected):
    g = trace_fn(fn, x="f32[N,4]", y="f32[N,4]", w="f32[4,3]", b="f32[4]")
    for n in BATCHES:
        feeds = {"x": grid((n, 4), 1), "y": grid((n, 4), 2), "w": grid((4, 3), 3), "b": grid((4,), 4)}
        got = gf.interpret(g, feeds).outputs[0]
        want = expected(**feeds)
        assert got.dtype == want.dtype
        assert got.shape == want.shape == g.outputs[0].type.concrete({"N": n})
        np.testing.assert_allclose(got, want, rtol=1e-6)


INDEX_CASES = [  # on x: f32[N,3,6]
    ("x[:, 2:5]", lambda x: x[:, 2:5], lambda x: x[:, 2:5], "f32[N,1,6]"),
    ("x[:, :, 2:5]", lambda x: x[:, :, 2:5], lambda x: x[:, :, 2:5], "f32[N,3,3]"),
    ("x[..., 0]", lambda x: x[..., 0], lambda x: x[..., 0], "f32[N,3]"),
    ("x[..., -1]", lambda x: x[..., -1], lambda x: x[..., -1], "f32[N,3]"),
    ("x[:, 1]", lambda x: x[:, 1], lambda x: x[:, 1], "f32[N,6]"),
    ("x[:, 1, 2:4]", lambda x: x[:, 1, 2:4], lambda x: x[:, 1, 2:4], "f32[N,2]"),
    ("x[..., ::2]", lambda x: x[..., ::2], lambda x: x[..., ::2], "f32[N,3,3]"),
    ("x[:, -2:]", lambda x: x[:, -2:], lambda x: x[:, -2:], "f32[N,2,6]"),
    ("x[:]", lambda x: x[:], lambda x: x[:], "f32[N,3,6]"),
    ("x.T", lambda x: x.T, lambda x: np.swapaxes(x, 1, 2), "f32[N,6,3]"),
    ("x.transpose(1, 0, 2)", lambda x: x.transpose(1, 0, 2), lambda x: x.transpose(1, 0, 2), "f32[3,N,6]"),
    ("x.reshape('N', -1)", lambda x: x.reshape("N", -1), lambda x: x.reshape(len(x), -1), "f32[N,18]"),
    ("x.reshape(('N', 2, -1))", lambda x: x.reshape(("N", 2, -1)), lambda x: x.reshape(len(x), 2, 9), "f32[N,2,9]"),
    ("x.reshape('N', 18)", lambda x: x.reshape("N", 18), lambda x: x.reshape(len(x), 18), "f32[N,18]"),
    ("x.reshape(-1, 'N')", lambda x: x.reshape(-1, "N"), lambda x: x.reshape(18, len(x)), "f32[18,N]"),
    ("x.flatten()", lambda x: x.flatten(), lambda x: x.reshape(len(x), 18), "f32[N,18]"),
    ("x.flatten(2)", lambda x: x.flatten(2), lambda x: x, "f32[N,3,6]"),
]


@pytest.mark.parametrize("text, fn, expected, out_type", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_indexing_transpose_and_reshape(text, fn, expected, out_type):
    g = trace_fn(fn, x="f32[N,3,6]")
    assert str(g.outputs[0].type) == out_type
    for n in BATCHES:
        x = randn((n, 3, 6), seed=n)
        np.testing.assert_array_equal(gf.interpret(g, {"x": x}).outputs[0], expected(x))


@pytest.mark.parametrize("fn, match", [
    (lambda x: x[1:], "batch axis"),
    (lambda x: x[:2], "batch axis"),
    (lambda x: x[0], "batch axis"),
    (lambda x: x[:, 3], "out of range"),
    (lambda x: x[:, ::-1], "step"),
    (lambda x: x[:, :, :, 0], "too many indices"),
    (lambda x: x[..., 0, ...], "'...'"),
    (lambda x: x[:, None], "unsupported index"),
    (lambda x: x.reshape(-1, 5), "cannot reshape"),  # (-1, 6) is [N*3, 6]: tests/test_attention.py
    (lambda x: x.reshape("N", -1, -1), "only one dimension"),
    (lambda x: x.reshape("N", 5), "element counts differ"),
    (lambda x: x.transpose(0, 1), "permutation"),
    (lambda x: x.sum(axis=3), "out of range"),
    (lambda x: F.concat([x, x.T]), "does not match"),
    (lambda x: F.concat([x, x], axis=0), "symbolic axis"),
], ids=["x[1:]", "x[:2]", "x[0]", "x[:,3]", "negative step", "too many", "two ellipses", "None", "reshape -1 N",
        "two -1", "count", "perm", "axis", "concat shapes", "concat N"])
def test_bad_indexing_and_reshapes_are_shape_errors(fn, match):
    with pytest.raises(ShapeError, match=match) as info:
        trace_fn(fn, x="f32[N,3,6]")
    assert HERE in str(info.value)


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 1, -1, (1, 2), (0, -1), (-2,)], ids=str)
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_reductions(op, axis, keepdims):
    g = trace_fn(lambda x: getattr(x, op)(axis=axis, keepdims=keepdims), x="f32[N,3,4]")
    g2 = trace_fn(lambda x: getattr(F, op)(x, axis, keepdims), x="f32[N,3,4]")  # method == function
    assert [(n.op, n.attrs) for n in g.nodes] == [(n.op, n.attrs) for n in g2.nodes] == \
        [(op, {"axes": tuple(sorted({a % 3 for a in np.atleast_1d(axis)})) if axis is not None else (0, 1, 2),
               "keepdims": keepdims})]
    for n in BATCHES:
        x = randn((n, 3, 4), seed=n)
        want = getattr(np, op)(x.astype(np.float64), axis=axis, keepdims=keepdims)
        got = gf.interpret(g, {"x": x}).outputs[0]
        assert got.shape == np.shape(want) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, **TOL)


def test_reduction_of_integers():
    g = trace_fn(lambda i: i.sum(axis=-1), i="i64[N,3]")
    np.testing.assert_array_equal(gf.interpret(g, {"i": np.arange(6).reshape(2, 3)}).outputs[0], [3, 12])
    with pytest.raises(ShapeError, match="mean"):
        trace_fn(lambda i: i.mean(), i="i64[N,3]")


def test_softmax_cross_entropy_and_mse_functions():
    g = trace_fn(lambda z, y, t: F.cross_entropy(z, y) + F.mse_loss(F.softmax(z), t) + 0 * F.log_softmax(z).sum(),
                 z="f32[N,5]", y="i64[N]", t="f32[N,5]")
    z, t = randn((3, 5)), randn((3, 5), seed=1)
    y = np.array([0, 4, 2])
    got = gf.interpret(g, {"z": z, "y": y, "t": t}).outputs[0]
    np.testing.assert_allclose(got, ref.cross_entropy(z, y) + ref.mse(ref.softmax(z), t), **TOL)


def test_training_flag_is_visible_to_functional_code():
    seen = []
    trace_fn(lambda x: (seen.append(F.training()), x)[1], x="f32[N,1]")
    gf.trace(Fn(lambda x: (seen.append(F.training()), x)[1]), inputs={"x": "f32[N,1]"}, train=True)
    assert seen == [False, True]
