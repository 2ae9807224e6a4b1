"""Op-table tests over the registry (JAX's per-op test lists).

1. completeness: every registered op has sample cases, a doc, a known kind, normalisable defaults;
2. for every case: the shape rule agrees with the numpy reference on dtype and shape, with the
   symbolic batch dimension bound to several sizes (one-node graph through the interpreter);
3. reference semantics against independent numpy/scipy formulas for the nontrivial ops;
4. errors: bad operands raise ShapeError / AttrError naming the op and the types involved;
   bad data (labels, ids out of range) raises InputError from the reference.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from op_cases import (
    CASES,
    CONFIDENT,
    bindings_for,
    build_graph,
    case_symbols,
    confident_logits,
    cross_entropy_f64,
    feeds_for,
    make_inputs,
)
from scipy import special

from gradfuse.errors import AttrError, InputError, ShapeError
from gradfuse.ir.graph import GraphBuilder
from gradfuse.ir.interpreter import interpret
from gradfuse.ir.registry import REQUIRED, all_ops, get_op, normalize_attr
from gradfuse.ir.types import as_type

KINDS = {"elementwise", "reduction", "shape", "structured", "source"}


def ref(op: str, *arrays, **attrs):
    """The reference of ``op`` with attributes normalised; a single result is unwrapped."""
    opdef = get_op(op)
    out = opdef.run_ref([np.asarray(a) for a in arrays], opdef.normalize_attrs(attrs))
    return out[0] if len(out) == 1 else out


def infer(op: str, *types: str, **attrs):
    opdef = get_op(op)
    return opdef.infer_types([as_type(t) for t in types], opdef.normalize_attrs(attrs))


def rng():
    return np.random.default_rng(0)


# ---- 1. completeness -------------------------------------------------------------------------
def test_every_op_has_cases():
    missing = sorted(set(all_ops()) - set(CASES))
    assert not missing, f"ops without cases in tests/op_cases.py: {', '.join(missing)}"
    stale = sorted(set(CASES) - set(all_ops()))
    assert not stale, f"cases for unregistered ops: {', '.join(stale)}"
    empty = sorted(op for op, cases in CASES.items() if not cases)
    assert not empty, f"ops with an empty case list: {', '.join(empty)}"


def test_every_op_has_a_symbolic_case():
    without = sorted(op for op, cases in CASES.items() if not any(case_symbols(c) for c in cases))
    assert not without, f"ops with no case using the batch symbol N: {', '.join(without)}"


@pytest.mark.parametrize("op", sorted(all_ops()))
def test_op_record(op):
    opdef = all_ops()[op]
    assert opdef.name == op
    assert opdef.doc.strip(), f"{op} has no doc"
    assert opdef.kind in KINDS, f"{op} has kind {opdef.kind!r}, not one of {sorted(KINDS)}"
    assert opdef.arity is None or opdef.arity >= 0
    assert len(opdef.output_names) == len(set(opdef.output_names)) >= 1
    for name, spec in opdef.attrs.items():
        if spec.default is not REQUIRED:
            assert normalize_attr(op, name, spec.kind, spec.default) == spec.default, \
                f"{op}: default {name}={spec.default!r} is not in normal form"


# ---- 2. infer vs ref, over the case table ----------------------------------------------------
def _case_params():
    for op in sorted(CASES):
        for i, c in enumerate(CASES[op]):
            for b in bindings_for(c):
                suffix = "".join(f"-{k}={v}" for k, v in b.items())
                yield pytest.param(op, i, b, id=f"{op}-{i}{suffix}")


@pytest.mark.parametrize(("op", "index", "bindings"), list(_case_params()))
def test_infer_agrees_with_ref(op, index, bindings):
    c = CASES[op][index]
    opdef = get_op(op)
    inferred = opdef.infer_types(list(c.types), opdef.normalize_attrs(c.attrs))
    assert len(inferred) == len(opdef.output_names)

    g = build_graph(op, c)  # the verifier runs in finish()
    assert tuple(v.type for v in g.outputs) == inferred
    feeds = feeds_for(g, c, bindings, rng())
    before = {k: v.copy() for k, v in feeds.items()}
    result = interpret(g, feeds)  # asserts each result's dtype and shape against the IR type

    for v, a in zip(g.outputs, result.outputs, strict=True):
        assert a.dtype == v.type.dtype.np, f"{op}: ref gave {a.dtype}, infer says {v.type}"
        assert a.shape == v.type.concrete(bindings), f"{op}: ref gave {a.shape}, infer says {v.type}"
    for k, a in before.items():
        np.testing.assert_array_equal(feeds[k], a, err_msg=f"{op}: the reference changed input %{k}")


def test_make_inputs_respects_domains():
    r = rng()
    x = make_inputs(CASES["log"][0], {"N": 50}, r)[0]
    assert x.dtype == np.float32 and (x > 0).all()
    logits, labels = make_inputs(CASES["softmax_cross_entropy"][0], {"N": 200}, r)
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < logits.shape[-1]
    table, ids = make_inputs(CASES["embedding"][1], {"N": 50}, r)
    assert ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < table.shape[0]


# ---- 3. reference semantics ------------------------------------------------------------------
def test_softmax_rows_sum_to_one_and_shift_invariant():
    x = rng().standard_normal((4, 6)) * 3
    p = ref("softmax", x, axis=1)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p, np.exp(x) / np.exp(x).sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(ref("softmax", x + 123.0, axis=1), p, rtol=1e-9)
    q = ref("softmax", x, axis=0)
    np.testing.assert_allclose(q.sum(axis=0), 1.0, rtol=1e-12)


def test_softmax_is_stable_for_large_logits():
    x = np.array([[1000.0, 0.0, -1000.0], [1000.0, 1000.0, 1000.0]], dtype=np.float32)
    p = ref("softmax", x, axis=1)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-7)


def test_log_softmax_is_log_of_softmax():
    x = rng().standard_normal((3, 5, 4))
    for axis in range(3):
        lp = ref("log_softmax", x, axis=axis)
        np.testing.assert_allclose(lp, np.log(ref("softmax", x, axis=axis)), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(lp, x - special.logsumexp(x, axis=axis, keepdims=True), rtol=1e-12, atol=1e-14)


def test_softmax_cross_entropy_formula():
    logits = rng().standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    direct = -np.mean([math.log(math.exp(logits[i, y]) / sum(math.exp(v) for v in logits[i]))
                       for i, y in enumerate(labels)])
    loss = ref("softmax_cross_entropy", logits, labels)
    assert loss.shape == () and loss.dtype == np.float64
    np.testing.assert_allclose(loss, direct, rtol=1e-12)
    # leading axes are all rows: the mean is over 2*3 of them
    logits3 = rng().standard_normal((2, 3, 4)).astype(np.float32)
    labels3 = np.array([[0, 1, 2], [3, 0, 1]], dtype=np.int32)
    np.testing.assert_allclose(ref("softmax_cross_entropy", logits3, labels3),
                               ref("softmax_cross_entropy", logits3.reshape(6, 4), labels3.reshape(6)), rtol=1e-6)


def test_softmax_cross_entropy_is_stable_for_large_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    np.testing.assert_allclose(ref("softmax_cross_entropy", logits, np.array([0, 0])), 0.0, atol=1e-6)
    np.testing.assert_allclose(ref("softmax_cross_entropy", logits, np.array([1, 1])), 1000.0, rtol=1e-6)
    np.testing.assert_allclose(ref("softmax_cross_entropy", logits, np.array([0, 2])), 1000.0, rtol=1e-6)


def test_softmax_cross_entropy_keeps_a_confident_models_small_loss():
    """float32 rows with losses 1e-4..1e-7, largest logit 5 or 30: within 1e-6 relative of float64
    (measured: 2e-7 at most). -log_softmax[label] gave 3e-4 at 1e-5 and 0.3 at 1e-7 (so does
    PyTorch's float32 cross_entropy on CPU: 2e-4, 0.35), rounding log(1 + tiny) at the size of 1."""
    for classes in (10, 1000):
        for loss, top in CONFIDENT:
            z, y = confident_logits(rng(), 64, classes, loss, top)
            got, want = ref("softmax_cross_entropy", z, y), cross_entropy_f64(z, y)
            assert got.dtype == np.float32
            assert abs(float(got) - want) <= 1e-6 * want, (classes, loss, top, float(got), want)
    z, y = confident_logits(rng(), 64, 10, 1e-7, 30.0)
    y[:4] = (y[:4] + 1) % 10  # a few confidently wrong rows, and some ties
    z[4:8] = 0.0
    want = cross_entropy_f64(z, y)
    assert abs(float(ref("softmax_cross_entropy", z, y)) - want) <= 1e-6 * want


def test_mse():
    p, t = rng().standard_normal((2, 3, 4))
    loss = ref("mse", p, t)
    assert loss.shape == ()
    np.testing.assert_allclose(loss, ((p - t) ** 2).sum() / p.size, rtol=1e-12)
    assert ref("mse", p, p) == 0.0


def test_layer_norm_normalises_then_applies_affine():
    x = rng().standard_normal((4, 3, 16)) * 5 + 2
    ones, zeros = np.ones(16), np.zeros(16)
    z = ref("layer_norm", x, ones, zeros, eps=1e-12)
    np.testing.assert_allclose(z.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.var(axis=-1), 1.0, rtol=1e-9)
    gamma, beta = rng().standard_normal((2, 16))
    y = ref("layer_norm", x, gamma, beta, eps=1e-5)
    expect = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(y, expect, rtol=1e-10, atol=1e-12)


def _bn_operands(shape):
    r = rng()
    c = shape[-1]
    return (r.standard_normal(shape) * 3 + 1, r.standard_normal(c), r.standard_normal(c),
            r.standard_normal(c), r.uniform(0.5, 2.0, c))


@pytest.mark.parametrize("shape", [(8, 3), (4, 5, 3)])
def test_batch_norm_train(shape):
    x, gamma, beta, rmean, rvar = _bn_operands(shape)
    m, eps = 0.2, 1e-5
    y, new_mean, new_var = ref("batch_norm_train", x, gamma, beta, rmean, rvar, momentum=m, eps=eps)
    rows = x.reshape(-1, shape[-1])
    mean, var = rows.mean(axis=0), rows.var(axis=0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + eps) * gamma + beta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new_mean, (1 - m) * rmean + m * mean, rtol=1e-12)
    np.testing.assert_allclose(new_var, (1 - m) * rvar + m * rows.var(axis=0, ddof=1), rtol=1e-12)
    # before the affine: zero mean, unit variance per feature
    z, _, _ = ref("batch_norm_train", x, np.ones(3), np.zeros(3), rmean, rvar, eps=1e-12)
    np.testing.assert_allclose(z.reshape(-1, 3).mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.reshape(-1, 3).var(axis=0), 1.0, rtol=1e-9)


def test_batch_norm_infer_uses_running_stats():
    x, gamma, beta, rmean, rvar = _bn_operands((6, 3))
    y = ref("batch_norm_infer", x, gamma, beta, rmean, rvar, eps=1e-3)
    np.testing.assert_allclose(y, (x - rmean) / np.sqrt(rvar + 1e-3) * gamma + beta, rtol=1e-12)
    # row i depends on row i only
    np.testing.assert_allclose(ref("batch_norm_infer", x[:1], gamma, beta, rmean, rvar, eps=1e-3), y[:1])


# ---- backward ops: the closed forms their forward ops' VJPs emit --------------------------------
def _along(f, x, v, h=1e-6):
    """The derivative of f at x along v, by central differences (float64)."""
    return (f(x + h * v) - f(x - h * v)) / (2 * h)


def test_softmax_cross_entropy_grad_is_p_minus_onehot():
    r = rng()
    logits, labels, g = r.standard_normal((4, 5)), np.array([0, 4, 2, 2]), np.float64(1.7)
    d = ref("softmax_cross_entropy_grad", logits, labels, g)
    np.testing.assert_allclose(d, g * (ref("softmax", logits, axis=1) - np.eye(5)[labels]) / 4, rtol=1e-12)
    v = r.standard_normal(logits.shape)
    fd = _along(lambda z: ref("softmax_cross_entropy", z, labels), logits, v)
    np.testing.assert_allclose(np.vdot(d, v), g * fd, rtol=1e-6)


def test_mse_grad():
    p, t = rng().standard_normal((2, 3, 4))
    np.testing.assert_allclose(ref("mse_grad", p, t, np.float64(0.5)), 0.5 * 2 * (p - t) / p.size, rtol=1e-12)


@pytest.mark.parametrize(("op", "forward", "shape"), [
    ("layer_norm_grad", "layer_norm", (3, 5)),
    ("batch_norm_train_grad", "batch_norm_train", (6, 4)),
    ("batch_norm_train_grad", "batch_norm_train", (2, 3, 4)),
])
def test_norm_grads_match_finite_differences(op, forward, shape):
    r = rng()
    c = shape[-1]
    x, g = r.standard_normal(shape), r.standard_normal(shape)
    gamma, beta = r.standard_normal((2, c))
    stats = (np.zeros(c), np.ones(c)) if forward == "batch_norm_train" else ()

    def loss(x, gamma, beta):  # <forward(x, gamma, beta), g>
        out = ref(forward, x, gamma, beta, *stats, eps=1e-3)
        return np.vdot(out[0] if isinstance(out, tuple) else out, g)

    args = [x, gamma, beta]
    grads = ref(op, x, gamma, g, eps=1e-3)
    for i, (arg, d) in enumerate(zip(args, grads, strict=True)):
        assert d.shape == arg.shape
        v = r.standard_normal(arg.shape)
        fd = _along(lambda a, i=i: loss(*args[:i], a, *args[i + 1:]), arg, v)
        np.testing.assert_allclose(np.vdot(d, v), fd, rtol=1e-6, atol=1e-9,
                                   err_msg=f"{op}: {('dx', 'dgamma', 'dbeta')[i]}")


def test_embedding_grad_is_the_transpose_of_embedding():
    r = rng()
    table, ids = r.standard_normal((6, 3)), np.array([[5, 0], [2, 2]])
    g = r.standard_normal((2, 2, 3))
    back = ref("embedding_grad", ids, g, rows=6)
    np.testing.assert_allclose(np.vdot(ref("embedding", table, ids), g), np.vdot(table, back), rtol=1e-12)
    np.testing.assert_allclose(back[2], g[1, 0] + g[1, 1])  # a repeated id sums its rows
    np.testing.assert_array_equal(back[[1, 3, 4]], 0.0)


def test_gelu_forms():
    x = np.linspace(-6, 6, 1001)
    exact = ref("gelu", x)
    np.testing.assert_allclose(exact, x * special.ndtr(x), rtol=1e-12, atol=1e-15)  # x * Phi(x)
    approx = ref("gelu", x, approximate="tanh")
    assert np.abs(exact - approx).max() < 1e-3
    assert ref("gelu", np.float32(0)) == 0 and ref("gelu", np.float32(0), approximate="tanh") == 0
    np.testing.assert_allclose(ref("gelu", np.array([10.0, -10.0])), [10.0, 0.0], atol=1e-12)


def test_gelu_grad_is_the_derivative_of_gelu():
    x = np.linspace(-5, 5, 201)
    g = rng().standard_normal(x.shape)
    h = 1e-6
    for form in ("none", "tanh"):
        fd = (ref("gelu", x + h, approximate=form) - ref("gelu", x - h, approximate=form)) / (2 * h)
        np.testing.assert_allclose(ref("gelu_grad", x, g, approximate=form), g * fd, rtol=1e-6, atol=1e-8)


def test_leaky_relu():
    x = np.array([-2.0, -0.5, 0.0, 3.0], dtype=np.float32)
    np.testing.assert_allclose(ref("leaky_relu", x), [-0.02, -0.005, 0.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(ref("leaky_relu", x, alpha=0.2), [-0.4, -0.1, 0.0, 3.0], rtol=1e-6)
    np.testing.assert_array_equal(ref("relu", x), [0, 0, 0, 3])


def test_unary_math():
    x = rng().uniform(0.1, 3.0, 50)
    np.testing.assert_allclose(ref("rsqrt", x), 1 / np.sqrt(x), rtol=1e-15)
    np.testing.assert_allclose(ref("sigmoid", x - 1.5), 1 / (1 + np.exp(1.5 - x)), rtol=1e-12)
    np.testing.assert_allclose(ref("erf", x - 1.5), [math.erf(v - 1.5) for v in x], rtol=1e-12)
    assert ref("sigmoid", np.float32(-1000)) == 0 and ref("sigmoid", np.float32(1000)) == 1


def test_cast_and_const():
    np.testing.assert_array_equal(ref("cast", np.array([-1.7, 0.5, 2.9], np.float32), dtype="i32"), [-1, 0, 2])
    np.testing.assert_array_equal(ref("cast", np.array([0.0, 2.0]), dtype="bool"), [False, True])
    c = ref("const", value=2.5, dtype="f64", shape=[2, 3])
    assert c.dtype == np.float64 and c.shape == (2, 3) and (c == 2.5).all()
    assert ref("const", value=4).dtype == np.float32 and ref("const", value=4).shape == ()


def test_const_with_symbolic_shape_through_interpreter():
    c = CASES["const"][1]  # f64 [N,3]
    g = build_graph("const", c)
    (out,) = interpret(g, feeds_for(g, c, {"N": 4})).outputs
    assert out.shape == (4, 3) and (out == 2.0).all()


def test_dropout_p0_is_identity():
    x = rng().standard_normal((5, 7)).astype(np.float32)
    np.testing.assert_array_equal(ref("dropout", x, np.int64(3), p=0.0, seed=1, stream=0), x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_rate_and_scale(p):
    x = np.ones(100_000, dtype=np.float32)
    y = ref("dropout", x, np.int64(0), p=p, seed=42, stream=1)
    dropped = np.mean(y == 0)
    assert abs(dropped - p) < 0.01, f"dropped {dropped:.4f} of elements with p={p}"
    np.testing.assert_allclose(y[y != 0], 1 / (1 - p), rtol=1e-6)


def _mask(step=0, seed=7, stream=0, p=0.5, dtype=np.float32, n=100_000):
    return ref("dropout", np.ones(n, dtype=dtype), np.int64(step), p=p, seed=seed, stream=stream) != 0


def test_dropout_mask_is_a_function_of_seed_stream_step():
    base = _mask()
    np.testing.assert_array_equal(_mask(), base)
    for other in (_mask(step=1), _mask(seed=8), _mask(stream=1)):
        # independent masks with p=0.5 agree on about half of the elements
        assert abs(np.mean(other == base) - 0.5) < 0.01
    np.testing.assert_array_equal(_mask(dtype=np.float64), base)
    # the mask of element i does not depend on the tensor's size or shape
    np.testing.assert_array_equal(_mask(n=1000), base[:1000])
    x = np.ones((10, 100), dtype=np.float32)
    np.testing.assert_array_equal(ref("dropout", x, np.int64(0), p=0.5, seed=7, stream=0).ravel() != 0, base[:1000])


def test_dropout_draws_without_overflow_warnings():
    # hash32 multiplies uint32 scalars modulo 2^32: numpy must not warn about the wraparound
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref("dropout", np.ones(10, np.float32), np.int64(5), p=0.5, seed=1, stream=2)


def test_embedding_picks_rows():
    table = rng().standard_normal((6, 3)).astype(np.float32)
    ids = np.array([[5, 0], [2, 2]], dtype=np.int32)
    out = ref("embedding", table, ids)
    assert out.shape == (2, 2, 3)
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(out[i, j], table[ids[i, j]])


@pytest.mark.parametrize(("a_shape", "b_shape", "ta", "tb"), [
    ((3, 4), (4, 5), False, False),
    ((4, 3), (4, 5), True, False),
    ((3, 4), (5, 4), False, True),
    ((2, 1, 4, 3), (5, 5, 4), True, True),
    ((6, 3, 4), (4, 2), False, False),
])
def test_matmul_matches_numpy(a_shape, b_shape, ta, tb):
    r = rng()
    a, b = r.standard_normal(a_shape), r.standard_normal(b_shape)

    def t(x, flag):
        return np.transpose(x, (*range(x.ndim - 2), x.ndim - 1, x.ndim - 2)) if flag else x

    out = ref("matmul", a, b, transpose_a=ta, transpose_b=tb)
    np.testing.assert_allclose(out, np.matmul(t(a, ta), t(b, tb)), rtol=1e-12)
    np.testing.assert_allclose(out, np.einsum("...ij,...jk->...ik", t(a, ta), t(b, tb)), rtol=1e-12)


def test_reductions_match_numpy():
    x = rng().standard_normal((3, 4, 5))
    for axes in [(), (0,), (1, 2), (0, 1, 2)]:
        for keepdims in (False, True):
            kw = {"axes": list(axes), "keepdims": keepdims}
            np.testing.assert_allclose(ref("sum", x, **kw), np.sum(x, axis=axes, keepdims=keepdims))
            np.testing.assert_allclose(ref("mean", x, **kw), np.mean(x, axis=axes, keepdims=keepdims))
            np.testing.assert_array_equal(ref("max", x, **kw), np.max(x, axis=axes, keepdims=keepdims))
    xi = np.arange(12, dtype=np.int32).reshape(3, 4)
    s = ref("sum", xi, axes=[0, 1])
    assert s.dtype == np.int32 and s == 66


def test_count_is_the_number_of_reduced_elements():
    x = np.zeros((3, 4, 5), np.float32)
    for axes, n in [((), 1), ((0,), 3), ((1, 2), 20), ((0, 1, 2), 60)]:
        c = ref("count", x, axes=list(axes))
        assert c.dtype == np.float32 and c.shape == () and c == n
        np.testing.assert_allclose(ref("mean", x + 1, axes=list(axes)) * c, ref("sum", x + 1, axes=list(axes)))
    c = CASES["count"][0]  # f32[N,4], axes [0]: reads the bound batch size
    g = build_graph("count", c)
    assert interpret(g, feeds_for(g, c, {"N": 7})).outputs[0] == 7


@pytest.mark.parametrize(("shape", "axis", "start", "stop", "step"), [
    ((4, 10), 1, 2, 8, 3), ((5, 3), 0, 1, 5, 1), ((6,), 0, 3, 3, 1), ((2, 3, 7), 2, 0, 7, 2)])
def test_slice_grad_is_the_transpose_of_slice(shape, axis, start, stop, step):
    r = rng()
    x = r.standard_normal(shape)
    kw = {"axis": axis, "start": start, "stop": stop, "step": step}
    y = ref("slice", x, **kw)
    g = r.standard_normal(y.shape)
    back = ref("slice_grad", g, size=shape[axis], **kw)
    assert back.shape == x.shape
    np.testing.assert_allclose(np.vdot(y, g), np.vdot(x, back), rtol=1e-12, atol=1e-12)  # <Sx, g> = <x, Sᵀg>
    np.testing.assert_array_equal(ref("slice", back, **kw), g)


def test_shape_ops_match_numpy():
    x = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(ref("reshape", x, shape=[6, 4]), x.reshape(6, 4))
    np.testing.assert_array_equal(ref("transpose", x, perm=[2, 0, 1]), x.transpose(2, 0, 1))
    np.testing.assert_array_equal(ref("slice", x, axis=2, start=1, stop=4, step=2), x[:, :, 1:4:2])
    np.testing.assert_array_equal(ref("slice", x, axis=1, start=0, stop=3), x[:, 0:3])
    y = np.arange(6.0).reshape(2, 3, 1)
    np.testing.assert_array_equal(ref("concat", x, y, axis=2), np.concatenate([x, y], axis=2))
    b = ref("broadcast_to", np.arange(3.0).reshape(3, 1), shape=[2, 3, 4])
    np.testing.assert_array_equal(b, np.broadcast_to(np.arange(3.0).reshape(3, 1), (2, 3, 4)))
    b[0, 0, 0] = 99.0  # a fresh array, not a read-only broadcast view
    w = ref("where", np.array([True, False]), np.array([1.0, 2.0]), np.float64(0))
    np.testing.assert_array_equal(w, [1.0, 0.0])


# ---- 4. errors -------------------------------------------------------------------------------
def _emit(op, types, attrs):
    b = GraphBuilder("bad")
    args = [b.arg(f"x{i}", as_type(t)) for i, t in enumerate(types)]
    b.emit(op, args, attrs)


# (op, operand types, attrs, error class, substrings the message must contain)
ERRORS = [
    # elementwise: dtypes, broadcasting, domains
    ("add", ["f32[N,64]", "f64[N,64]"], {}, ShapeError, ["add", "f32[N,64]", "f64[N,64]", ".astype"]),
    ("add", ["f32[N,4]", "f32[N,5]"], {}, ShapeError, ["add", "cannot broadcast", "f32[N,4]", "f32[N,5]"]),
    ("mul", ["f32[N,4]", "f32[3,4]"], {}, ShapeError, ["mul", "f32[N,4]", "f32[3,4]"]),
    ("where", ["bool[N,4]", "f32[N,4]", "f64[]"], {}, ShapeError, ["where", "f32[N,4]", "f64[]", ".astype"]),
    ("where", ["bool[2]", "f32[3]", "f32[3]"], {}, ShapeError, ["where", "bool[2]", "f32[3]"]),
    ("div", ["i32[4]", "i32[4]"], {}, ShapeError, ["div", "i32"]),
    ("logical_and", ["f32[2]", "f32[2]"], {}, ShapeError, ["logical_and", "f32"]),
    ("exp", ["i64[N]"], {}, ShapeError, ["exp", "i64"]),
    ("add", ["f32[2]"], {}, ShapeError, ["add", "2 operand", "got 1"]),
    ("add", ["f32[2]", "f32[2]"], {"foo": 1}, AttrError, ["add", "unknown attribute foo"]),
    ("leaky_relu", ["f32[2]"], {"alpha": "big"}, AttrError, ["leaky_relu", "alpha"]),
    ("gelu", ["f32[2]"], {"approximate": "erf"}, (ShapeError, AttrError), ["gelu", "erf", "tanh"]),
    ("gelu_grad", ["f32[N,4]", "f32[4]"], {}, ShapeError, ["gelu_grad", "f32[N,4]", "f32[4]"]),
    ("gelu_grad", ["f32[N,4]", "f64[N,4]"], {}, ShapeError, ["gelu_grad", ".astype"]),
    ("cast", ["f32[2]"], {}, AttrError, ["cast", "missing required attribute dtype"]),
    ("cast", ["f32[2]"], {"dtype": "f16"}, AttrError, ["cast", "dtype", "f16"]),
    ("const", [], {"value": "one"}, AttrError, ["const", "value"]),
    ("const", [], {"value": 1.0, "shape": [-1]}, AttrError, ["const", "shape", "negative"]),
    ("const", [], {"value": 1.0, "shape": ["2N"]}, AttrError, ["const", "shape", "identifier"]),
    # matmul
    ("matmul", ["f32[N,64]", "f32[32,10]"], {}, ShapeError, ["matmul", "inner", "f32[N,64]", "f32[32,10]"]),
    ("matmul", ["f32[N,64]", "f32[10,64]"], {"transpose_a": True}, ShapeError, ["matmul", "f32[N,64]ᵀ", "N"]),
    ("matmul", ["f32[64]", "f32[64,10]"], {}, ShapeError, ["matmul", "rank >= 2", "f32[64]"]),
    ("matmul", ["f32[N,4]", "f64[4,2]"], {}, ShapeError, ["matmul", "f32[N,4]", "f64[4,2]", ".astype"]),
    ("matmul", ["i32[2,2]", "i32[2,2]"], {}, ShapeError, ["matmul", "i32"]),
    ("matmul", ["f32[2,4,5]", "f32[3,5,6]"], {}, ShapeError, ["matmul", "cannot broadcast"]),
    ("matmul", ["f32[2,2]", "f32[2,2]"], {"transpose_a": 1}, AttrError, ["matmul", "transpose_a"]),
    # softmax family and losses
    ("softmax", ["f32[N,10]"], {"axis": 2}, ShapeError, ["softmax", "axis 2", "f32[N,10]"]),
    ("softmax", ["f32[N,10]"], {"axis": -1}, ShapeError, ["softmax", "axis -1", "f32[N,10]"]),
    ("softmax", ["f32[N,10]"], {}, AttrError, ["softmax", "missing required attribute axis"]),
    ("log_softmax", ["i32[N,10]"], {"axis": 1}, ShapeError, ["log_softmax", "i32"]),
    ("softmax_cross_entropy", ["f32[N,10]", "f32[N,10]"], {}, ShapeError,
     ["softmax_cross_entropy", "labels", "f32[N,10]"]),
    ("softmax_cross_entropy", ["f32[N,10]", "i64[N,10]"], {}, ShapeError,
     ["softmax_cross_entropy", "i64[N,10]", "f32[N,10]", "[N]", "one-hot"]),
    ("softmax_cross_entropy", ["f32[N,10]", "i64[3]"], {}, ShapeError, ["softmax_cross_entropy", "i64[3]"]),
    ("mse", ["f32[N,1]", "f32[N]"], {}, ShapeError, ["mse", "f32[N,1]", "f32[N]"]),
    ("mse", ["f32[N]", "f64[N]"], {}, ShapeError, ["mse", ".astype"]),
    ("softmax_cross_entropy_grad", ["f32[N,10]", "i64[N]", "f32[N]"], {}, ShapeError,
     ["softmax_cross_entropy_grad", "f32[]", "f32[N]"]),
    ("mse_grad", ["f32[N,4]", "f32[N,4]", "f64[]"], {}, ShapeError, ["mse_grad", "f32[]", "f64[]"]),
    # normalisation and lookup
    ("layer_norm_grad", ["f32[N,8]", "f32[8]", "f32[N,4]"], {}, ShapeError,
     ["layer_norm_grad", "f32[N,4]", "f32[N,8]"]),
    ("batch_norm_train_grad", ["f32[N,8]", "f32[4]", "f32[N,8]"], {}, ShapeError,
     ["batch_norm_train_grad", "f32[4]", "f32[N,8]"]),
    ("layer_norm", ["f32[N,8]", "f32[4]", "f32[8]"], {}, ShapeError, ["layer_norm", "f32[4]", "f32[8]", "f32[N,8]"]),
    ("layer_norm", ["f32[]", "f32[]", "f32[]"], {}, ShapeError, ["layer_norm", "rank", "f32[]"]),
    ("layer_norm", ["f32[N,8]", "f64[8]", "f64[8]"], {}, ShapeError, ["layer_norm", ".astype"]),
    ("batch_norm_train", ["f32[6]"] * 5, {}, ShapeError, ["batch_norm_train", "batch axis", "f32[6]"]),
    ("batch_norm_train", ["f32[N,6]", "f32[6]", "f32[6]", "f32[6]", "f32[5]"], {}, ShapeError,
     ["batch_norm_train", "f32[5]", "f32[6]"]),
    ("batch_norm_infer", ["f32[N,6]", "f32[6]", "f32[6]", "f32[6]", "f64[6]"], {}, ShapeError,
     ["batch_norm_infer", "f64[6]", ".astype"]),
    ("batch_norm_train", ["f32[N,6]"] + ["f32[6]"] * 4, {"momentum": None}, AttrError,
     ["batch_norm_train", "momentum"]),
    ("embedding", ["f32[10,4,2]", "i64[N]"], {}, ShapeError, ["embedding", "table", "rank 2", "f32[10,4,2]"]),
    ("embedding", ["f32[10,4]", "f32[N]"], {}, ShapeError, ["embedding", "ids", "f32[N]"]),
    ("embedding_grad", ["i64[N]", "f32[3,4]"], {"rows": 10}, ShapeError, ["embedding_grad", "f32[3,4]", "i64[N]"]),
    ("embedding_grad", ["f32[N]", "f32[N,4]"], {"rows": 10}, ShapeError, ["embedding_grad", "ids", "f32[N]"]),
    ("embedding_grad", ["i64[N]", "f32[N,4]"], {}, AttrError, ["embedding_grad", "rows"]),
    # dropout
    ("dropout", ["f32[N,4]", "i32[]"], {"p": 0.5, "seed": 0, "stream": 0}, ShapeError, ["dropout", "step", "i32[]"]),
    ("dropout", ["f32[N,4]", "i64[N]"], {"p": 0.5, "seed": 0, "stream": 0}, ShapeError, ["dropout", "step", "i64[N]"]),
    ("dropout", ["f32[N,4]", "i64[]"], {"p": 1.0, "seed": 0, "stream": 0}, (ShapeError, AttrError),
     ["dropout", "p=1.0"]),
    ("dropout", ["f32[N,4]", "i64[]"], {"p": 0.5, "stream": 0}, AttrError, ["dropout", "seed"]),
    # reductions
    ("sum", ["f32[N,4,5]"], {"axes": [1, 0]}, ShapeError, ["sum", "[1, 0]", "f32[N,4,5]"]),
    ("sum", ["f32[N,4,5]"], {"axes": [3]}, ShapeError, ["sum", "[3]", "f32[N,4,5]"]),
    ("mean", ["f32[N,4]"], {"axes": [1, 1]}, ShapeError, ["mean", "[1, 1]", "f32[N,4]"]),
    ("max", ["f32[N,4]"], {"axes": [-1]}, ShapeError, ["max", "[-1]", "f32[N,4]"]),
    ("mean", ["i32[N,4]"], {"axes": [1]}, ShapeError, ["mean", "i32"]),
    ("count", ["f32[N,4]"], {"axes": [2]}, ShapeError, ["count", "[2]", "f32[N,4]"]),
    ("sum", ["f32[N,4]"], {"axes": 1}, AttrError, ["sum", "axes", "list of ints"]),
    # data movement
    ("reshape", ["f32[N,64]"], {"shape": ["N", 8, 4]}, ShapeError, ["reshape", "f32[N,64]", "[N,8,4]", "element"]),
    ("reshape", ["f32[N,4]"], {"shape": [8, 2]}, ShapeError, ["reshape", "f32[N,4]", "[8,2]"]),
    ("reshape", ["f32[N,4]"], {"shape": ["M", 4]}, ShapeError, ["reshape", "f32[N,4]", "[M,4]"]),
    ("transpose", ["f32[N,3]"], {"perm": [0, 0]}, ShapeError, ["transpose", "[0, 0]", "f32[N,3]"]),
    ("transpose", ["f32[N,3,2]"], {"perm": [1, 0]}, ShapeError, ["transpose", "[1, 0]", "f32[N,3,2]"]),
    ("broadcast_to", ["f32[3]"], {"shape": [4]}, ShapeError, ["broadcast_to", "f32[3]", "[4]"]),
    ("broadcast_to", ["f32[2,3]"], {"shape": [3]}, ShapeError, ["broadcast_to", "f32[2,3]", "[3]"]),
    ("broadcast_to", ["f32[N,3]"], {"shape": [2, 3]}, ShapeError, ["broadcast_to", "f32[N,3]"]),
    ("slice", ["f32[N,10]"], {"axis": 0, "start": 0, "stop": 1}, ShapeError,
     ["slice", "symbolic axis", "N", "f32[N,10]"]),
    ("slice", ["f32[N,10]"], {"axis": 1, "start": 0, "stop": 11}, ShapeError, ["slice", "[0:11:1]", "f32[N,10]"]),
    ("slice", ["f32[N,10]"], {"axis": 1, "start": 5, "stop": 2}, ShapeError, ["slice", "[5:2:1]", "f32[N,10]"]),
    ("slice", ["f32[N,10]"], {"axis": 1, "start": 0, "stop": 4, "step": 0}, ShapeError, ["slice", "[0:4:0]"]),
    ("slice", ["f32[N,10]"], {"axis": 2, "start": 0, "stop": 1}, ShapeError, ["slice", "axis 2", "f32[N,10]"]),
    ("slice_grad", ["f32[N,3]"], {"axis": 1, "start": 2, "stop": 8, "step": 3, "size": 10}, ShapeError,
     ["slice_grad", "f32[N,3]", "[2:8:3]"]),
    ("concat", ["f32[N,3]", "f32[2,4]"], {"axis": 1}, ShapeError, ["concat", "f32[2,4]", "f32[N,3]", "axis 1"]),
    ("concat", ["f32[N,3]", "f32[N,3]"], {"axis": 0}, ShapeError, ["concat", "symbolic axis", "f32[N,3]"]),
    ("concat", ["f32[3]", "f32[2,3]"], {"axis": 0}, ShapeError, ["concat", "f32[2,3]", "f32[3]"]),
    ("concat", ["f32[3]", "i32[3]"], {"axis": 0}, ShapeError, ["concat", "i32[3]", ".astype"]),
    ("concat", [], {"axis": 0}, ShapeError, ["concat", "at least one operand"]),
]


def _error_id(e):
    op, types, attrs = e[:3]
    return f"{op}-{','.join(types)}" + (f"-{','.join(map(str, attrs.values()))}" if attrs else "")


@pytest.mark.parametrize(("op", "types", "attrs", "exc", "needles"), ERRORS, ids=[_error_id(e) for e in ERRORS])
def test_bad_operands_raise(op, types, attrs, exc, needles):
    with pytest.raises(exc) as info:
        _emit(op, types, attrs)
    message = str(info.value)
    missing = [n for n in needles if n not in message]
    assert not missing, f"message {message!r} lacks {missing}"


def test_every_op_family_has_an_error_case():
    covered = {e[0] for e in ERRORS}
    kinds = {all_ops()[op].kind for op in covered}
    assert kinds >= KINDS, f"no error case for kinds {sorted(KINDS - kinds)}"


# Shape errors raised through a shared helper must still name the operands.
UNCLEAR = [
    ("matmul", ["f32[2,4,5]", "f32[3,5,6]"], {}, ["f32[2,4,5]", "f32[3,5,6]"],
     "ir/ops/linalg.py _matmul_infer: batch mismatch message prints the batch-only types f32[2] and f32[3]"),
    ("exp", ["i64[N,4]"], {}, ["i64[N,4]"],
     "ir/ops/common.py same_dtype: 'dtype i64 is not supported' does not print the operand type"),
    ("where", ["f32[N,4]", "f32[N,4]", "f32[N,4]"], {}, ["condition", "f32[N,4]"],
     "ir/ops/common.py same_dtype: where's condition dtype error does not say it is the condition"),
    ("embedding", ["i64[10,4]", "i64[N]"], {}, ["table", "i64[10,4]"],
     "ir/ops/common.py same_dtype: embedding's table dtype error does not say it is the table"),
    ("softmax_cross_entropy", ["f32[]", "i64[]"], {}, ["f32[]", "rank"],
     "ir/ops/nn.py _xent_infer: rank-0 logits say 'labels i64[] do not match ... expected labels of shape []'"),
]


@pytest.mark.parametrize(("op", "types", "attrs", "needles"), [
    pytest.param(*u[:4], id=_error_id(u)) for u in UNCLEAR])
def test_error_message_names_the_operands(op, types, attrs, needles):
    with pytest.raises(ShapeError) as info:
        _emit(op, types, attrs)
    message = str(info.value)
    assert all(n in message for n in needles), message


# Backward ops' shape rules must reject bad operands with a ShapeError, as their forward ops do,
# rather than crash (the verifier and the IR parser run them on whatever text they are given).
CRASHES = [
    ("embedding_grad", ["i64[]", "f32[]"], {"rows": 3},
     "ir/ops/nn.py _embedding_grad_infer: a rank-0 gradient raises IndexError (g.shape[-1])"),
    ("embedding_grad", ["i64[N]", "f32[N,4]"], {"rows": -1},
     "ir/ops/nn.py _embedding_grad_infer: rows=-1 raises a bare ValueError from check_dim"),
    ("layer_norm_grad", ["f32[]", "f32[]", "f32[]"], {},
     "ir/ops/nn.py _norm_grad_infer: no rank check; rank-0 x raises IndexError in _affine_params"),
    ("batch_norm_train_grad", ["f32[6]", "f32[6]", "f32[6]"], {},
     "ir/ops/nn.py _norm_grad_infer: accepts a rank-1 input that batch_norm_train rejects"),
]


@pytest.mark.parametrize(("op", "types", "attrs"), [
    pytest.param(*c[:3], id=_error_id(c)) for c in CRASHES])
def test_backward_op_rejects_bad_operands(op, types, attrs):
    with pytest.raises((ShapeError, AttrError)) as info:
        _emit(op, types, attrs)
    assert op in str(info.value)


def test_shape_error_carries_a_hint():
    with pytest.raises(ShapeError) as info:
        infer("add", "f32[N,64]", "f64[N,64]")
    assert info.value.hint and ".astype" in info.value.hint
    assert str(info.value.located("mlp.py:12 fc1")).startswith("mlp.py:12 fc1: add:")


_LOGITS, _TABLE = np.zeros((3, 10), np.float32), np.zeros((5, 2), np.float32)


@pytest.mark.parametrize(("op", "operands", "needles"), [
    ("softmax_cross_entropy", (_LOGITS, np.array([0, 10, 2])), ["softmax_cross_entropy", "[0, 10)", "max 10"]),
    ("softmax_cross_entropy", (_LOGITS, np.array([0, -1, 2], np.int32)), ["softmax_cross_entropy", "min -1"]),
    ("embedding", (_TABLE, np.array([[1, 5]])), ["embedding", "[0, 5)", "max 5"]),
    ("embedding", (_TABLE, np.array([-1], np.int32)), ["embedding", "min -1"]),
])
def test_out_of_range_indices_raise_input_error(op, operands, needles):
    with pytest.raises(InputError) as info:
        ref(op, *operands)
    assert all(n in str(info.value) for n in needles), str(info.value)


def test_out_of_range_labels_through_interpreter():
    c = CASES["softmax_cross_entropy"][0]
    g = build_graph("softmax_cross_entropy", c)
    feeds = feeds_for(g, c, {"N": 3})
    feeds["x1"] = np.array([0, 1, 10])
    with pytest.raises(InputError, match="softmax_cross_entropy"):
        interpret(g, feeds)
