"""Mistakes in a model reported at trace time in the user's terms: file, line, layer, shapes, fix."""

from __future__ import annotations

import os

import numpy as np
import pytest
from dsl_helpers import MLP, Fn, body_line, trace_fn

import gradfuse as gf
from gradfuse import functional as F
from gradfuse import nn
from gradfuse.errors import GradfuseError, InputError, ShapeError

HERE = os.path.basename(__file__)


# ==== 6. errors in the user's terms ============================================================
def test_linear_on_unflattened_images_says_flatten_first():
    class Net(nn.Module):
        def __init__(self):
            self.fc1 = nn.Linear(64, 32)

        def forward(self, x):
            return self.fc1(x)

    with pytest.raises(ShapeError) as info:
        gf.trace(Net(), inputs={"x": "f32[N,8,8]"})
    msg = str(info.value)
    for part in ("Linear(64, 32)", "f32[N,8,8]", f"{HERE}:{body_line(Net.forward)}", "flatten first?", "fc1"):
        assert part in msg, (part, msg)


def test_linear_with_the_wrong_feature_count():
    class Net(nn.Module):
        def __init__(self):
            self.fc1 = nn.Linear(10, 4)
            self.fc2 = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x))

    with pytest.raises(ShapeError) as info:
        gf.trace(Net(), inputs={"x": "f32[N,10]"})
    msg = str(info.value)
    for part in ("Linear(5, 2)", "f32[N,4]", "fc2", "4 features", f"{HERE}:{body_line(Net.forward)}"):
        assert part in msg, (part, msg)
    assert "flatten" not in msg


@pytest.mark.parametrize("net, in_type, parts", [
    (nn.Residual(nn.Linear(4, 3)), "f32[N,4]", ["Residual", "f32[N,4]", "f32[N,3]", "same shape"]),
    (nn.BatchNorm(5), "f32[N,4]", ["BatchNorm(5)", "f32[N,4]"]),
    (nn.LayerNorm(5), "f32[N,3,4]", ["LayerNorm(5)", "f32[N,3,4]"]),
    (nn.MultiHeadSelfAttention(6, 2), "f32[N,6]", ["MultiHeadSelfAttention(6, heads=2)", "f32[N,6]"]),
    (nn.MultiHeadSelfAttention(6, 2), "f32[N,3,4]", ["MultiHeadSelfAttention(6, heads=2)", "f32[N,3,4]"]),
    (nn.SinusoidalPositionalEncoding(4, 6), "f32[N,5,6]", ["T <= 4", "f32[N,5,6]"]),
    (nn.LearnedPositionalEncoding(4, 6), "f32[N,3,5]", ["f32[N,3,5]", "dim=6"]),
    (nn.Linear(3, 2), "f32[N]", ["Linear(3, 2)", "f32[N]"]),
], ids=["residual", "batchnorm", "layernorm", "attention rank", "attention dim", "sinusoidal T", "learned dim",
        "linear rank 1"])
def test_layer_shape_errors(net, in_type, parts):
    with pytest.raises(ShapeError) as info:
        gf.trace(net, inputs={"x": in_type})
    msg = str(info.value)
    for part in parts + [HERE]:
        assert part in msg, (part, msg)


def test_embedding_with_float_ids():
    with pytest.raises(ShapeError) as info:
        gf.trace(nn.Embedding(10, 4), inputs={"ids": "f32[N,5]"})
    msg = str(info.value)
    for part in ("Embedding(10, 4)", "f32[N,5]", "integer", "i64", HERE):
        assert part in msg, (part, msg)


def test_attention_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="6 is not divisible by heads 4"):
        nn.MultiHeadSelfAttention(6, 4)


def test_mixing_f32_and_f64_suggests_astype():
    def mix(x, y):
        return x + y

    with pytest.raises(ShapeError) as info:
        trace_fn(mix, x="f32[N,3]", y="f64[N,3]")
    msg = str(info.value)
    for part in ("f32[N,3]", "f64[N,3]", ".astype", f"{HERE}:{body_line(mix)}"):
        assert part in msg, (part, msg)


def test_numpy_array_inside_forward():
    def fn(x):
        return x + np.ones(3, np.float32)

    with pytest.raises(ShapeError, match="ndarray") as info:
        trace_fn(fn, x="f32[N,3]")
    assert "parameter or buffer" in str(info.value)
    assert f"{HERE}:{body_line(fn)}" in str(info.value)


@pytest.mark.parametrize("fn", [
    lambda x: np.ones(3, np.float32) + x,
    lambda x: (np.ones(3, np.float32) * x).sum(),
    lambda x: x @ np.eye(3, dtype=np.float32),
    lambda x: F.concat([x, np.ones((2, 3), np.float32)], axis=-1),
], ids=["array + x", "(array * x).sum()", "x @ array", "concat with array"])
def test_numpy_array_anywhere_in_forward_is_a_located_error(fn):
    try:
        trace_fn(fn, x="f32[N,3]")
    except GradfuseError as e:
        assert "ndarray" in str(e) and HERE in str(e)
    else:
        raise AssertionError("traced a graph that silently used a numpy array")


def test_float_scalar_with_integer_tensor_is_not_truncated():
    try:
        g = trace_fn(lambda i: i + 0.5, i="i64[N]")
    except GradfuseError as e:
        assert "astype" in str(e)
        return
    out = gf.interpret(g, {"i": np.array([1, 2])}).outputs[0]
    np.testing.assert_allclose(out, [1.5, 2.5])


def test_transpose_of_a_vector_is_not_an_internal_error():
    try:
        g = trace_fn(lambda x: x.sum(axis=0).T, x="f32[N,3]")
    except GradfuseError:
        return
    assert str(g.outputs[0].type) == "f32[3]"


def test_functional_ops_outside_a_trace():
    with pytest.raises(GradfuseError, match="gradfuse.trace"):
        F.relu(np.ones(3, np.float32))
    with pytest.raises(GradfuseError, match="gradfuse.trace"):
        MLP()(np.ones((1, 64), np.float32))


def test_tensor_has_no_truth_value():
    with pytest.raises(TypeError, match="where"):
        trace_fn(lambda x: x if x > 0 else -x, x="f32[N,3]")


def test_forward_must_return_a_tensor():
    with pytest.raises(GradfuseError, match="must return one tensor"):
        trace_fn(lambda x: (x, x), x="f32[N,3]")


def test_bad_input_signature():
    with pytest.raises(GradfuseError, match="input 'x'"):
        gf.trace(MLP(), inputs={"x": "float[N,64]"})


def test_bad_op_attributes_are_located():
    with pytest.raises(ShapeError, match="approximate") as info:
        gf.trace(nn.Sequential(nn.GELU("fast")), inputs={"x": "f32[N,3]"})
    assert HERE in str(info.value) and "in layer 0 = GELU(approximate='fast')" in str(info.value)
    with pytest.raises(ValueError, match=r"Dropout\(p=1.0\).*\[0, 1\)"):
        nn.Dropout(1.0)
    with pytest.raises(ShapeError, match=r"dropout probability must be in \[0, 1\)"):
        gf.trace(Fn(lambda x: F.dropout(x, 1.5)), inputs={"x": "f32[N,3]"}, train=True)


def test_loss_must_be_a_scalar():
    def per_example(pred, y):
        return (pred - y) ** 2

    model = gf.Model(nn.Linear(3, 2), inputs={"x": "f32[N,3]"}, targets={"y": "f32[N,2]"}, loss=per_example)
    with pytest.raises(ShapeError, match=r"loss must be a scalar tensor, got f32\[N,2\]"):
        model.trace(with_loss=True)
    model = gf.Model(nn.Linear(3, 2), inputs={"x": "f32[N,3]"}, targets={"y": "f32[N,2]"}, loss=lambda p, y: 0.0)
    with pytest.raises(ShapeError, match="got float"):
        model.trace(with_loss=True)


def test_model_needs_a_module_and_a_loss_to_trace_with_loss():
    with pytest.raises(GradfuseError, match="must be a gradfuse.nn.Module, got function"):
        gf.Model(lambda x: x, inputs={"x": "f32[N,3]"})
    model = gf.Model(nn.Linear(3, 2), inputs={"x": "f32[N,3]"})
    with pytest.raises(GradfuseError, match="no loss"):
        model.trace(with_loss=True)


def test_interpreter_checks_feeds():
    g = gf.trace(nn.Linear(3, 2), inputs={"x": "f32[N,3]"})
    params = nn.Linear(3, 2).initial_values()
    with pytest.raises(InputError, match="f32"):
        gf.interpret(g, {"x": np.ones((2, 3)), **params})
    with pytest.raises(InputError, match="shape"):
        gf.interpret(g, {"x": np.ones((2, 4), np.float32), **params})
    with pytest.raises(InputError, match="weight"):
        gf.interpret(g, {"x": np.ones((2, 3), np.float32)})
