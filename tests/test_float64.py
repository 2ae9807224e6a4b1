"""``gradfuse.compile(model, dtype="f64")``: every float in float64, the generated kernels agree
with the reference interpreter run on the same float64 graphs to ~1e-12 (forward and training
steps of the three examples), and the dtype of what users pass is handled as documented."""

import numpy as np
import pytest

import gradfuse as gf
from gradfuse.errors import GradfuseError, InputError
from gradfuse.ir.graph import ArgKind
from gradfuse.passes.precision import with_float
from gradfuse.stages import training_step

EXAMPLES = ["digits_mlp", "residual_mlp", "digits_attention"]
TOL = 1e-10  # relative to the largest magnitude; measured: ~1e-15


def close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype == np.float64, (what, got.dtype, want.dtype)
    scale = max(float(np.abs(want).max()), 1.0)  # weights and logits are O(1); a zero-gradient bias is noise
    assert float(np.abs(got - want).max()) <= TOL * scale, what


@pytest.fixture(scope="module")
def compiled64(example_model, kernel_cache):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = gf.compile(example_model(name), gf.SGD(momentum=0.9), dtype="f64", cache_dir=kernel_cache)
        return cache[name]

    return get


@pytest.mark.parametrize("name", EXAMPLES)
def test_f64_compile_matches_the_interpreter(example_model, compiled64, name):
    model = example_model(name)
    compiled = compiled64(name)
    assert all(t.dtype is gf.DType.f64 for t in compiled.inputs.values())
    assert str(compiled.targets["y"]) == "i64[N]"  # integer labels stay integers
    assert {a.dtype for a in compiled.weights.values() if a.dtype.kind == "f"} == {np.dtype(np.float64)}
    assert compiled.predict_program.graph.outputs[0].type.dtype is gf.DType.f64

    data = model.data()
    x = data["x_train"][:6].astype(np.float64)
    forward = with_float(model.trace(), gf.DType.f64)
    weights = model.initial_values("f64")
    want = gf.interpret(forward, {"x": x, **weights}).outputs[0]
    close(compiled.predict(x), want, "predict")

    # the same training steps, with momentum, in the interpreter (the state carried along)
    step = training_step(model, gf.SGD(momentum=0.9))
    graph = with_float(step.graph, gf.DType.f64)
    state = {v.name: np.zeros(v.type.concrete({}), v.type.dtype.np) for kind, v in graph.args
             if kind is not ArgKind.input}
    state.update(weights)
    rng = np.random.default_rng(0)
    weights_before = {k: v.copy() for k, v in compiled.weights.items()}
    try:
        for _ in range(3):
            idx = rng.choice(len(data["x_train"]), 16, replace=False)
            xb, yb = data["x_train"][idx].astype(np.float64), data["y_train"][idx]
            ref = gf.interpret(graph, {"x": xb, "y": yb, "lr": np.float64(0.05), **state})
            state.update(ref.state)
            loss = compiled.train_step(xb, yb, lr=0.05)
            assert abs(loss - float(ref.outputs[0])) <= TOL * abs(float(ref.outputs[0]))
        for k, v in state.items():
            if v.dtype.kind == "f":
                close(compiled.weights[k], v, k)
            else:
                np.testing.assert_array_equal(compiled.weights[k], v, err_msg=k)
    finally:
        for k, v in weights_before.items():
            compiled.weights[k][...] = v


def test_f32_inputs_are_widened_and_f64_inputs_to_f32_are_refused(example_model, compiled64, kernel_cache):
    model = example_model("digits_mlp")
    compiled = compiled64("digits_mlp")
    x32 = model.data()["x_test"][:5].astype(np.float32)
    np.testing.assert_array_equal(compiled.predict(x32), compiled.predict(x32.astype(np.float64)))
    f32 = gf.compile(model, cache_dir=kernel_cache)
    with pytest.raises(InputError, match=r"expects f32\[N,64\].*float64.*astype"):
        f32.predict(x32.astype(np.float64))


def test_dtype_argument(example_model, kernel_cache):
    model = example_model("digits_mlp")
    with pytest.raises(GradfuseError, match="'f32' or 'f64'"):
        gf.compile(model, dtype="i32", cache_dir=kernel_cache)
    default = gf.compile(model, cache_dir=kernel_cache)
    for spelled in ("f32", gf.DType.f32, np.float32):
        same = gf.compile(model, dtype=spelled, cache_dir=kernel_cache)
        assert str(same.predict_program.graph) == str(default.predict_program.graph)
        assert same.inputs == default.inputs
    by_dtype = gf.compile(model, dtype=gf.DType.f64, cache_dir=kernel_cache)
    assert str(by_dtype.inputs["x"]) == "f64[N,64]"


def test_f64_weights_loaded_into_a_model_stay_exact_in_an_f64_compile(kernel_cache):
    from gradfuse import nn

    model = gf.Model(nn.Linear(3, 2), inputs={"x": "f32[N,3]"})
    w = np.array([[1 / 3, 2 / 3], [1e-9 + 1, np.pi], [np.e, -1 / 7]])
    model.load_state_dict({"weight": w, "bias": np.array([0.1, 0.2])})
    assert model.initial_values()["weight"].dtype == np.float32  # the tensor's own dtype, as PyTorch
    compiled = gf.compile(model, dtype="f64", cache_dir=kernel_cache)
    np.testing.assert_array_equal(compiled.weights["weight"], w)
    x = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(compiled.predict(x), x @ w + [0.1, 0.2], rtol=1e-15)
