"""Optimizer steps as IR (passes/optimizer.py): Adam's bias correction against the formula and
against torch.optim.Adam, and parameters the loss does not depend on, which every optimizer
leaves alone (as PyTorch does with a parameter whose .grad is None) and the printed IR names."""

import numpy as np
import pytest

import gradfuse as gf
from gradfuse import functional as F
from gradfuse import nn
from gradfuse.ir.graph import Graph
from gradfuse.ir.parser import parse_graph
from gradfuse.passes.optimizer import SGD, Adam
from gradfuse.stages import backward, training_step


class MLP(nn.Module):
    def __init__(self, spare: bool = False):
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        if spare:
            self.spare = nn.Linear(8, 4)  # registered, but forward never uses it

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def mlp(spare: bool = False) -> gf.Model:
    return gf.Model(MLP(spare), inputs={"x": "f32[N,8]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy,
                    name="spare_mlp" if spare else "mlp")


def batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((32, 8)).astype(np.float32), rng.integers(0, 4, 32)) for _ in range(n)]


def with_steps(step, names) -> Graph:
    """The training step also returning each param's update %<name>.step (lr·m̂/(√v̂+ε) for Adam)."""
    g = step.graph
    return Graph(g.name, g.args, g.nodes, g.outputs + [g.value(f"{k}.step") for k in names], g.updates)


# ---- Adam's bias correction ------------------------------------------------------------------
def test_adam_first_step_is_lr_times_g_over_abs_g_plus_eps():
    """On step 1, m̂ = g and v̂ = g² exactly, so the update is lr·g/(|g| + ε): within 3e-7 relative
    (measured 2e-7: a few float32 roundings). With 1 - β2^t in float32 it was 6.8e-6 short."""
    model = mlp()
    step = training_step(model, Adam())
    names = list(model.initial_values())
    grads = backward(model)
    x, y = batches(1)[0]
    feeds = {"x": x, "y": y, **model.initial_values()}
    g = dict(zip(grads.grads, gf.interpret(grads.graph, feeds).outputs[2:], strict=True))
    out = gf.interpret(with_steps(step, names), {**feeds, "lr": np.float32(1e-3), **step.new_state}).outputs
    for name, got in zip(names, out[-len(names):], strict=True):
        gn = g[name].astype(np.float64)
        want = 1e-3 * gn / (np.abs(gn) + 1e-8)
        np.testing.assert_allclose(got, want, rtol=3e-7, atol=0, err_msg=name)


def test_adam_bias_corrections_are_computed_in_float64():
    g = training_step(mlp(), Adam()).graph
    nodes = {n.outputs[0].name: n for n in g.nodes}
    assert nodes["adam.t"].op == "cast" and str(nodes["adam.t"].outputs[0].type) == "f64[]"
    for k in (1, 2):
        assert str(nodes[f"adam.bias{k}.f64"].outputs[0].type) == "f64[]"
        assert nodes[f"adam.bias{k}"].op == "cast" and str(nodes[f"adam.bias{k}"].outputs[0].type) == "f32[]"
    text = str(g)
    assert "%c0.1: f32[] = const" in text and "%c0.09999999999999998" not in text  # names: shortest f32 repr
    assert str(parse_graph(text)) == text


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_steps_match_torch(weight_decay):
    """Ten Adam steps of a small MLP against torch.optim.Adam, from the same weights and batches.
    Each step's update (%<param>.step, float32) is compared with the update torch's Adam makes
    from its own moments, evaluated in float64 (lr/(1-β1^t) · m / (√v/√(1-β2^t) + ε)), and the two
    are put back in lockstep (torch's weights and moments) after every step. Measured: 2e-7 on
    step 1 and at most 5e-7 (float32 gradients summed in another order); it was 7e-6 on step 1
    and 4e-6..1e-5 on every step with 1 - β^t in float32."""
    torch = pytest.importorskip("torch")
    model = mlp()
    opt = Adam(weight_decay=weight_decay)
    step = training_step(model, opt)
    names = list(model.initial_values())
    g = with_steps(step, names)
    init = model.initial_values()
    init["fc1.bias"] = np.random.default_rng(1).standard_normal(16).astype(np.float32) * 0.1
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    topt = torch.optim.Adam(list(tp.values()), lr=1e-3, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                            weight_decay=weight_decay)
    state = {**init, **step.new_state}
    for t, (x, y) in enumerate(batches(10), 1):
        topt.zero_grad()
        h = torch.relu(torch.from_numpy(x) @ tp["fc1.weight"] + tp["fc1.bias"])
        torch.nn.functional.cross_entropy(h @ tp["fc2.weight"] + tp["fc2.bias"], torch.from_numpy(y)).backward()
        topt.step()
        result = gf.interpret(g, {"x": x, "y": y, "lr": np.float32(1e-3), **state})
        state.update(result.state)
        assert state["adam.step"] == t
        for name, got in zip(names, result.outputs[-len(names):], strict=True):
            moments = topt.state[tp[name]]
            m, v = (moments[k].detach().numpy().astype(np.float64) for k in ("exp_avg", "exp_avg_sq"))
            want = 1e-3 / (1 - opt.beta1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - opt.beta2 ** t) + opt.eps)
            error = np.abs(got - want).max() / np.abs(want).max()
            assert error < 1e-6, f"step {t}, %{name}: update off by {error:.1e} relative"
            state[name] = tp[name].detach().numpy().copy()
            state[f"{name}.adam_m"], state[f"{name}.adam_v"] = (
                moments[k].detach().numpy().copy() for k in ("exp_avg", "exp_avg_sq"))


# ---- parameters the loss does not depend on --------------------------------------------------
SPARE = ("spare.weight", "spare.bias")


def test_gradients_name_the_params_the_loss_does_not_depend_on():
    assert backward(mlp(spare=True)).independent == SPARE
    assert backward(mlp()).independent == ()


@pytest.mark.parametrize("optimizer", [SGD(momentum=0.9, weight_decay=0.1), Adam(weight_decay=0.01)],
                         ids=["sgd", "adam"])
def test_optimizer_leaves_a_param_without_gradient_alone(optimizer):
    """No weight decay, no momentum, no Adam step and no state for %spare.*; the rest train."""
    model = mlp(spare=True)
    step = training_step(model, optimizer)
    assert step.left_alone == SPARE
    assert not any(k.startswith("spare.") for k in step.new_state)
    assert not any(old.name.startswith("spare.") for old, _ in step.graph.updates)
    init = model.initial_values()
    state = {**init, **step.new_state}
    for x, y in batches(3):
        state.update(gf.interpret(step.graph, {"x": x, "y": y, "lr": np.float32(0.1), **state}).state)
    for name, before in init.items():
        if name in SPARE:
            np.testing.assert_array_equal(state[name], before, err_msg=name)
        else:
            assert not np.array_equal(state[name], before), f"{name} did not train"


@pytest.mark.parametrize("optimizer", [SGD(momentum=0.9, weight_decay=0.1), Adam(weight_decay=0.01)],
                         ids=["sgd", "adam"])
def test_training_step_ir_says_which_params_are_left_alone(optimizer):
    text = str(training_step(mlp(spare=True), optimizer).graph)
    lines = text.splitlines()
    header = lines.index("  # ---- optimizer update ----")
    assert lines[header + 1].startswith("  # left alone (no gradient reaches them")
    assert lines[header + 1].endswith(": %spare.weight, %spare.bias")
    assert "the loss does not depend on %spare.weight" in text  # the zero gradient's own note
    assert str(parse_graph(text)) == text
    assert "left alone" not in str(training_step(mlp(), optimizer).graph)


def test_compiled_training_leaves_the_spare_param_alone(kernel_cache):
    model = mlp(spare=True)
    compiled = gf.compile(model, Adam(weight_decay=0.01), cache_dir=kernel_cache)
    before = {k: v.copy() for k, v in compiled.weights.items()}
    for x, y in batches(2):
        compiled.train_step(x, y, lr=0.01)
    for name in model.initial_values():
        assert np.array_equal(compiled.weights[name], before[name]) == (name in SPARE), name
