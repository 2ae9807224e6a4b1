"""The compiled CPU program end to end: it trains like the interpreter, reaches the accuracy,
and refuses bad input before any kernel runs."""

import numpy as np
import pytest

import gradfuse as gf
from gradfuse.errors import InputError, NumericError
from gradfuse.passes.optimizer import SGD
from gradfuse.stages import training_step


@pytest.fixture(scope="module")
def digits(example_model):
    return example_model("digits_mlp").data()


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_compiled_training_matches_the_interpreter(example_model, kernel_cache, digits, momentum):
    """With plain SGD each weight's update folds into the GEMM of its gradient (alpha=-lr, beta=1);
    with momentum the gradient feeds the velocity, so it does not. Check mode runs the last step."""
    model = example_model("digits_mlp")
    step = training_step(model, SGD(momentum=momentum))
    compiled = gf.compile(model, gf.SGD(momentum=momentum), cache_dir=kernel_cache)
    folded = compiled.train_program.source.count("# SGD folded into the GEMM")
    assert folded == (0 if momentum else 2)  # fc1, fc2 (digits_mlp has two Linear layers)
    state = {**model.initial_values(), **step.new_state}
    rng = np.random.default_rng(1)
    for i in range(5):
        idx = rng.choice(len(digits["x_train"]), 32, replace=False)
        x, y = digits["x_train"][idx], digits["y_train"][idx]
        ref = gf.interpret(step.graph, {"x": x, "y": y, "lr": np.float32(0.05), **state})
        state.update(ref.state)
        compiled.check = i == 4
        loss = compiled.train_step(x, y, lr=0.05)
        assert loss == pytest.approx(float(ref.outputs[0]), rel=1e-4, abs=1e-5)
    for name, value in state.items():
        np.testing.assert_allclose(compiled.weights[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_digits_mlp_reaches_95_percent(example_model, kernel_cache, digits):
    compiled = gf.compile(example_model("digits_mlp"), gf.SGD(momentum=0.9), cache_dir=kernel_cache)
    rng = np.random.default_rng(0)
    n = len(digits["x_train"])
    for _ in range(10):
        order = rng.permutation(n)
        for i in range(0, n, 64):
            b = order[i:i + 64]
            compiled.train_step(digits["x_train"][b], digits["y_train"][b], lr=0.05)
    accuracy = (compiled.predict(digits["x_test"]).argmax(1) == digits["y_test"]).mean()
    assert accuracy >= 0.95


def test_any_batch_size_including_one(compiled_digits, digits):
    for n in (1, 7, 300):
        out = compiled_digits.predict(digits["x_test"][:n])
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, compiled_digits.predict(digits["x_test"][:300])[:n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("x", "message"), [
    (np.zeros((4, 63), np.float32), "expects f32[N,64], got shape [4, 63]"),
    (np.zeros((4, 8, 8), np.float32), "expects f32[N,64], got shape [4, 8, 8]"),
    (np.zeros((4, 64), np.float64), "dtype float64 (convert it with .astype(np.float32))"),
    (np.zeros((0, 64), np.float32), "the batch is empty"),
], ids=["features", "rank", "dtype", "empty"])
def test_bad_inputs_are_refused_before_any_kernel_runs(compiled_digits, x, message):
    before = {k: v.copy() for k, v in compiled_digits.weights.items()}
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        compiled_digits.train_step(x, np.zeros(len(x), np.int64), lr=0.1)
    for k, v in before.items():
        np.testing.assert_array_equal(compiled_digits.weights[k], v)  # nothing was half-updated


@pytest.mark.parametrize(("x", "message"), [
    (np.zeros((4, 63), np.float32), "expects f32[N,64], got shape [4, 63]"),
    (np.zeros((4, 64), np.float64), "dtype float64"),
    (np.zeros((4, 64), np.int32), "dtype int32"),
    (np.zeros((0, 64), np.float32), "the batch is empty"),
], ids=["features", "float64", "int32", "empty"])
def test_small_inference_runs_in_one_compiled_call(compiled_digits, digits, monkeypatch, x, message):
    """The second call at a batch size goes through checked_step compiled with a signature, not
    the Python step; wrong inputs still get the checked path's errors, and nothing runs."""
    program = compiled_digits.predict_program
    assert program.one_dispatch
    x4 = digits["x_test"][:4]
    want = compiled_digits.predict(x4)  # a new batch size: the Python path makes its buffers
    monkeypatch.setattr(program.module, "step", lambda *a: pytest.fail("the Python step ran"))
    np.testing.assert_array_equal(compiled_digits.predict(x4), want)
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        compiled_digits.predict(x)
    x4_strided = np.repeat(x4, 2, axis=1)[:, ::2]  # not C-contiguous: converted by the checked path
    monkeypatch.undo()
    np.testing.assert_array_equal(compiled_digits.predict(x4_strided), want)


def test_labels_out_of_range_and_mismatched_batches(compiled_digits):
    x = np.zeros((4, 64), np.float32)
    with pytest.raises(InputError, match=r"labels must lie in \[0, 10\), got min 0, max 10"):
        compiled_digits.train_step(x, np.array([0, 1, 2, 10]), lr=0.1)
    with pytest.raises(InputError, match="N=3, but an earlier input has N=4"):
        compiled_digits.train_step(x, np.zeros(3, np.int64), lr=0.1)
    with pytest.raises(InputError, match=r"expected 2 array\(s\) \(x, y\), got 1"):
        compiled_digits.train_step(x, lr=0.1)


def test_non_contiguous_input_is_converted(compiled_digits, digits):
    x = np.asfortranarray(digits["x_test"][:16])
    np.testing.assert_allclose(compiled_digits.predict(x), compiled_digits.predict(np.ascontiguousarray(x)))


def test_check_mode_names_the_first_op_that_made_a_nan(compiled_digits, digits):
    x = digits["x_train"][:8].copy()
    x[3, 5] = np.nan
    compiled_digits.check = True
    try:
        with pytest.raises(NumericError, match=r"kernel k0: %fc1.matmul = matmul at digits_mlp.py:\d+ in fc1 "
                                               r"produced NaN/Inf \(its input %x is not finite"):
            compiled_digits.predict(x)
    finally:
        compiled_digits.check = False
