"""Issue-level checks of the generated backward and training-step graphs on the digits MLP:
gradients equal a hand-written backprop from the course notes, the printed backward IR is
golden, and the interpreter trains the model with SGD and with Adam."""

import numpy as np
import pytest

import gradfuse as gf
from gradfuse.gradcheck import gradcheck
from gradfuse.ir.parser import parse_graph
from gradfuse.passes.autodiff import differentiate
from gradfuse.passes.optimizer import SGD, Adam
from gradfuse.stages import backward, training_step


@pytest.fixture(scope="module")
def mlp(example_model):
    return example_model("digits_mlp")


@pytest.fixture(scope="module")
def digits(mlp):
    return mlp.data()


def numpy_backprop(w, x, y):
    """Backprop written from the course notes (§04, §06), batch-major: Z = A W + b, dW = Aᵀ dZ,
    dA = dZ Wᵀ, ReLU mask [z > 0], softmax-CE gradient (p - onehot(y)) / N."""
    z1 = x @ w["fc1.weight"] + w["fc1.bias"]
    a1 = np.maximum(z1, 0)
    z2 = a1 @ w["fc2.weight"] + w["fc2.bias"]
    p = np.exp(z2 - z2.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    dz2 = (p - np.eye(10)[y]) / len(y)
    dz1 = (dz2 @ w["fc2.weight"].T) * (z1 > 0)
    grads = {"fc2.weight": a1.T @ dz2, "fc2.bias": dz2.sum(0), "fc1.weight": x.T @ dz1, "fc1.bias": dz1.sum(0)}
    return loss, grads


def test_gradients_equal_hand_written_backprop(mlp, digits):
    x, y = digits["x_train"][:32], digits["y_train"][:32]
    weights = mlp.initial_values()
    grads = backward(mlp)
    result = gf.interpret(grads.graph, {"x": x, "y": y, **weights})
    loss, expected = numpy_backprop({k: v.astype(np.float64) for k, v in weights.items()}, x.astype(np.float64), y)
    assert result.outputs[0] == pytest.approx(loss, rel=1e-5)
    got = dict(zip(grads.grads, result.outputs[2:], strict=True))
    assert set(got) == set(expected)
    for name, g in expected.items():
        np.testing.assert_allclose(got[name], g, rtol=1e-4, atol=1e-6, err_msg=name)


def test_backward_ir_is_golden_and_round_trips(mlp, golden):
    text = str(backward(mlp).graph)
    golden("digits_mlp.backward.gfir", text)
    assert str(parse_graph(text)) == text


def test_backward_ir_reads_like_the_chain_rule(mlp):
    g = backward(mlp)
    notes = {n.outputs[0].name: n.note for n in g.graph.nodes if n.note}
    assert "(softmax(z) - onehot(y)) / n" in notes["grad.fc2"]
    assert notes["grad.fc1"].startswith("vjp(relu) of %relu: g * (x > 0)")
    assert "wrt rhs: aᵀ·g" in notes["grad.fc1.weight"]
    assert {v.name for v in g.saved} == {"x", "y", "fc1", "relu", "fc2"}


def train(mlp, digits, optimizer, lr, steps=60, batch=64):
    step = training_step(mlp, optimizer)
    state = {**mlp.initial_values(), **step.new_state}
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(digits["x_train"]), batch, replace=False)
        feeds = {"x": digits["x_train"][idx], "y": digits["y_train"][idx], "lr": np.float32(lr), **state}
        result = gf.interpret(step.graph, feeds)
        losses.append(float(result.outputs[0]))
        state.update(result.state)
    return losses, state


@pytest.mark.parametrize(("optimizer", "lr"), [(SGD(momentum=0.9), 0.05), (Adam(), 0.003)], ids=["sgd", "adam"])
def test_interpreter_trains_the_mlp(mlp, digits, optimizer, lr):
    losses, state = train(mlp, digits, optimizer, lr)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses
    weights = {k: v for k, v in state.items() if k in mlp.initial_values()}
    (logits,) = gf.interpret(mlp.trace(), {"x": digits["x_test"], **weights}).outputs
    assert (logits.argmax(1) == digits["y_test"]).mean() > 0.85


def test_sgd_step_matches_the_update_rule(mlp, digits):
    x, y = digits["x_train"][:16], digits["y_train"][:16]
    weights = mlp.initial_values()
    step = training_step(mlp, SGD(momentum=0.9, weight_decay=0.01))
    feeds = {"x": x, "y": y, "lr": np.float32(0.1), **weights, **step.new_state}
    new = gf.interpret(step.graph, feeds).state
    _, grads = numpy_backprop(weights, x, y)
    for name, g in grads.items():
        velocity = g + 0.01 * weights[name]  # v = 0.9 * 0 + (g + wd p)
        np.testing.assert_allclose(new[f"{name}.momentum"], velocity, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(new[name], weights[name] - 0.1 * velocity, rtol=1e-4, atol=1e-6)


def test_adam_first_step_moves_each_weight_by_about_lr(mlp, digits):
    weights = mlp.initial_values()
    step = training_step(mlp, Adam())
    feeds = {"x": digits["x_train"][:16], "y": digits["y_train"][:16], "lr": np.float32(1e-3), **weights,
             **step.new_state}
    new = gf.interpret(step.graph, feeds).state
    assert new["adam.step"] == 1
    moved = np.abs(new["fc2.weight"] - weights["fc2.weight"])
    assert np.allclose(moved[moved > 1e-7], 1e-3, rtol=1e-2)  # m̂/√v̂ = ±1 on the first step


def test_gradcheck_of_the_mlp_is_below_1e6(mlp):
    report = gradcheck(mlp, batch=8, directions=2)
    assert {r.name for r in report} == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert max(r.worst_rel_error for r in report) < 1e-6


def test_gradcheck_catches_a_wrong_rule(mlp):
    """The check can fail: break relu's VJP (drop the mask) and it reports a large error."""
    from gradfuse.ir.registry import get_op

    relu = get_op("relu")
    original = relu.vjp
    object.__setattr__(relu, "vjp", lambda ctx, g: [g])  # OpDef is frozen; restored below
    try:
        report = gradcheck(mlp, batch=8, directions=1)
    finally:
        object.__setattr__(relu, "vjp", original)
    assert max(r.worst_rel_error for r in report) > 1e-2


def test_backward_of_residual_model_with_batchnorm_and_dropout(example_model):
    model = example_model("residual_mlp")
    report = gradcheck(model, batch=8, directions=1)
    assert max(r.worst_rel_error for r in report) < 1e-6
    zero = {r.name for r in report if r.zero}
    assert zero == {"blocks.0.block.fc1.bias", "blocks.1.block.fc1.bias"}  # biases right before BatchNorm


def test_differentiate_wrt_inputs(mlp):
    g = differentiate(mlp.trace(train=True, with_loss=True), wrt=["x"])
    assert list(g.grads) == ["x"] and g.grads["x"].type == g.graph.inputs[0].type
