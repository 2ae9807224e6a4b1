"""Weights in and out: ``Model.load_state_dict``, ``CompiledModel.state_dict`` /
``load_state_dict`` (also on a loaded artifact), the errors that name every entry that does not
fit, and PyTorch's state_dict through ``gradfuse.from_pytorch`` / ``to_pytorch``: a PyTorch module
and the equivalent gradfuse model give the same outputs, gradients and SGD step."""

import os

import numpy as np
import pytest

import gradfuse as gf
from gradfuse import functional as F
from gradfuse import nn
from gradfuse.loader import load_model
from gradfuse.passes.autodiff import differentiate
from gradfuse.passes.precision import with_float

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def fresh(name: str) -> gf.Model:
    """A new instance of an example model (the session fixture's is shared: not loaded into)."""
    return load_model(os.path.join(EXAMPLES, f"{name}.py"))


class TwoLayer(nn.Module):
    def __init__(self):
        self.fc1 = nn.Linear(4, 3)
        self.norm = nn.BatchNorm(3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.norm(self.fc1(x))))


def two_layer() -> gf.Model:
    return gf.Model(TwoLayer(), inputs={"x": "f32[N,4]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy)


# ---- round trips ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(kernel_cache):
    """residual_mlp (BatchNorm, dropout) after a few SGD+momentum steps."""
    model = fresh("residual_mlp")
    compiled = gf.compile(model, gf.SGD(momentum=0.9), cache_dir=kernel_cache)
    data = model.data()
    for i in range(4):
        compiled.train_step(data["x_train"][i * 32:(i + 1) * 32], data["y_train"][i * 32:(i + 1) * 32], lr=0.05)
    return compiled, data["x_test"][:50]


def test_state_dict_is_parameters_and_buffers_without_optimizer_state(trained):
    compiled, _ = trained
    state = compiled.state_dict()
    model = fresh("residual_mlp")
    assert list(state) == [name for name, _ in model.net.named_tensors()]  # PyTorch's order: definition order
    assert not any(k.endswith(".momentum") for k in state) and "rng.step" not in state
    assert any(k.endswith(".momentum") for k in compiled.weights)
    name = "blocks.0.block.norm.running_mean"
    assert np.abs(state[name]).max() > 0  # trained running statistics are in it
    state[name][...] = 7.0  # a copy
    assert not np.any(compiled.weights[name] == 7.0)


def test_round_trip_through_a_fresh_model(trained, kernel_cache):
    compiled, x = trained
    model = fresh("residual_mlp")
    assert model.load_state_dict(compiled.state_dict()) == ([], [])
    again = gf.compile(model, cache_dir=kernel_cache)
    np.testing.assert_array_equal(again.predict(x), compiled.predict(x))
    untrained = gf.compile(fresh("residual_mlp"), cache_dir=kernel_cache)
    assert not np.allclose(untrained.predict(x), compiled.predict(x))


def test_compiled_load_state_dict_writes_in_place(trained, kernel_cache):
    compiled, x = trained
    target = gf.compile(fresh("residual_mlp"), gf.SGD(momentum=0.9), cache_dir=kernel_cache)
    arrays = {k: id(v) for k, v in target.weights.items()}
    state64 = {k: v.astype(np.float64) for k, v in compiled.state_dict().items()}  # converted, as PyTorch's copy_
    target.load_state_dict(state64)
    assert {k: id(v) for k, v in target.weights.items()} == arrays
    assert target.weights["stem.weight"].dtype == np.float32
    np.testing.assert_array_equal(target.predict(x), compiled.predict(x))
    assert np.all(target.weights["stem.weight.momentum"] == 0)  # optimizer state is not part of it


def test_load_state_dict_into_a_loaded_artifact(kernel_cache, tmp_path):
    from gradfuse.runtime import artifact

    model = gf.Model(TwoLayer(), inputs={"x": "f32[N,4]"})  # inference only: quicker to save
    compiled = gf.compile(model, cache_dir=kernel_cache)
    artifact.save(compiled, str(tmp_path / "art"))
    loaded = gf.load(str(tmp_path / "art"))
    rng = np.random.default_rng(0)
    state = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in loaded.state_dict().items()}
    state["norm.running_var"] = np.abs(state["norm.running_var"]) + 0.5
    loaded.load_state_dict(state)
    compiled.load_state_dict(state)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x), compiled.predict(x))
    np.testing.assert_array_equal(loaded.state_dict()["fc1.weight"], state["fc1.weight"])


# ---- errors --------------------------------------------------------------------------------
def test_one_error_names_every_missing_unexpected_and_misshaped_entry():
    model = two_layer()
    state = model.initial_values()
    del state["fc2.bias"], state["norm.running_var"]
    state["fc3.weight"] = np.zeros((2, 2), np.float32)
    state["fc1.weight"] = np.zeros((3, 4), np.float32)  # PyTorch's [out, in]
    state["fc2.weight"] = np.zeros((3, 5), np.float32)
    state["norm.weight"] = np.zeros(3, np.int64)
    with pytest.raises(gf.StateDictError) as err:
        model.load_state_dict(state)
    assert str(err.value) == (
        "the state_dict does not fit model two_layer: missing norm.running_var (f32[3]), fc2.bias (f32[2]); "
        "unexpected fc3.weight; "
        "fc1.weight is [3, 4], the model has f32[4,3]: a PyTorch Linear weight? convert with "
        "gradfuse.from_pytorch(state_dict, model); "
        "norm.weight has dtype i64, the model has f32[3] (a float array is needed); "
        "fc2.weight is [3, 5], the model has f32[3,2]")
    assert "\n" not in str(err.value)
    assert isinstance(err.value, gf.GradfuseError)


def test_non_strict_loading_reports_what_it_skipped_but_refuses_wrong_shapes():
    model = two_layer()
    before = model.initial_values()
    result = model.load_state_dict({"fc1.bias": np.ones(3), "extra": np.ones(1)}, strict=False)
    assert result.missing_keys == [k for k in before if k != "fc1.bias"] and result.unexpected_keys == ["extra"]
    after = model.initial_values()
    np.testing.assert_array_equal(after["fc1.bias"], np.ones(3, np.float32))
    np.testing.assert_array_equal(after["fc1.weight"], before["fc1.weight"])
    with pytest.raises(gf.StateDictError, match=r"fc1.bias is \[4\], the model has f32\[3\]"):
        model.load_state_dict({"fc1.bias": np.ones(4)}, strict=False)


def test_a_failed_load_writes_nothing(kernel_cache):
    compiled = gf.compile(two_layer(), cache_dir=kernel_cache)
    before = compiled.state_dict()
    state = {k: v + 1 for k, v in before.items()}
    state["fc2.bias"] = np.zeros(5, np.float32)
    with pytest.raises(gf.StateDictError, match=r"compiled model two_layer: fc2.bias is \[5\], the model has f32\[2\]"):
        compiled.load_state_dict(state)
    for k, v in compiled.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_a_pytorch_state_dict_loaded_directly_is_pointed_to_from_pytorch():
    model = gf.Model(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm(3)), inputs={"x": "f32[N,4]"})
    torch_like = {"0.weight": np.zeros((3, 4)), "0.bias": np.zeros(3), "1.weight": np.ones(3), "1.bias": np.zeros(3),
                  "1.running_mean": np.zeros(3), "1.running_var": np.ones(3), "1.num_batches_tracked": np.array(5)}
    with pytest.raises(gf.StateDictError, match=r"unexpected 1.num_batches_tracked \(a PyTorch state_dict\? "
                                                r"convert it with gradfuse.from_pytorch"):
        model.load_state_dict(torch_like)
    model.load_state_dict(gf.from_pytorch(torch_like, model))


def test_the_square_weight_trap():
    """A square PyTorch Linear weight has the shape gradfuse expects: loaded without the mapping it
    is accepted and computes x W instead of x Wᵀ. from_pytorch transposes it."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 4)), rng.normal(size=4)  # PyTorch's layout: [out, in]
    x = rng.normal(size=(3, 4))
    torch_out = x @ w.T + b

    def predict(state):
        model = gf.Model(nn.Linear(4, 4), inputs={"x": "f32[N,4]"})
        model.load_state_dict(state)
        return gf.interpret(with_float(model.trace()), {"x": x, **model.initial_values("f64")}).outputs[0]

    assert not np.allclose(predict({"weight": w, "bias": b}), torch_out)  # silently wrong
    np.testing.assert_allclose(predict(gf.from_pytorch({"weight": w, "bias": b}, nn.Linear(4, 4))), torch_out,
                               rtol=1e-6)


def test_from_pytorch_errors_use_pytorch_names_and_layouts():
    net = TwoLayer()
    good = {"fc1.weight": np.zeros((3, 4)), "fc1.bias": np.zeros(3), "norm.weight": np.ones(3),
            "norm.bias": np.zeros(3), "norm.running_mean": np.zeros(3), "norm.running_var": np.ones(3),
            "norm.num_batches_tracked": np.array(3),
            "fc2.weight": np.zeros((2, 3)), "fc2.bias": np.zeros(2)}
    out = gf.from_pytorch(good, net)
    assert out["fc1.weight"].shape == (4, 3) and "norm.num_batches_tracked" not in out
    bad = dict(good, **{"fc1.weight": np.zeros((4, 3)), "head.weight": np.zeros(1)})
    del bad["fc2.bias"]
    with pytest.raises(gf.StateDictError) as err:
        gf.from_pytorch(bad, net)
    assert str(err.value) == ("the PyTorch state_dict does not fit TwoLayer: missing fc2.bias ([2]); unexpected "
                              "head.weight; fc1.weight is [4, 3], expected [3, 4] in PyTorch's layout "
                              "(transposed: already converted?)")
    with pytest.raises(gf.StateDictError, match="strip the 'module.' prefix"):
        gf.from_pytorch({f"module.{k}": v for k, v in good.items()}, net)
    assert set(gf.from_pytorch({"fc1.bias": np.zeros(3)}, net, strict=False)) == {"fc1.bias"}


def test_to_pytorch_inverts_from_pytorch():
    model = fresh("digits_attention")
    values = model.initial_values()
    theirs = gf.to_pytorch(values, model)
    assert theirs["attn.in_proj_weight"].shape == (96, 32) and theirs["embed.weight"].shape == (32, 8)
    assert "attn.out_proj.weight" in theirs and "position.table" not in theirs  # a fixed table, not written
    back = gf.from_pytorch(theirs, model)
    assert list(back) == list(values)
    for k, v in values.items():  # the sinusoidal table comes back computed in float64
        np.testing.assert_array_equal(back[k].astype(v.dtype), v, err_msg=k)


# ---- against PyTorch -----------------------------------------------------------------------
def _torch():
    return pytest.importorskip("torch", reason="the PyTorch comparison needs torch (pip install torch)")


def _cases(torch):
    T = torch.nn

    class TorchEmbed(T.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.norm, self.fc = T.Embedding(50, 16), T.LayerNorm(16), T.Linear(16, 3)

        def forward(self, ids):
            return self.fc(self.norm(self.emb(ids)).mean(1))

    class Embed(nn.Module):
        def __init__(self):
            self.emb, self.norm, self.fc = nn.Embedding(50, 16), nn.LayerNorm(16), nn.Linear(16, 3)

        def forward(self, ids):
            return self.fc(F.mean(self.norm(self.emb(ids)), axis=1))

    class TorchAttention(T.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = T.MultiheadAttention(16, 4, batch_first=True), T.Linear(16, 5)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))

    class Attention(nn.Module):
        def __init__(self):
            self.attn, self.fc = nn.MultiHeadSelfAttention(16, 4), nn.Linear(16, 5)

        def forward(self, x):
            return self.fc(F.mean(self.attn(x), axis=1))

    rng = np.random.default_rng(0)
    return {
        "mlp_batchnorm": (T.Sequential(T.Linear(20, 32), T.ReLU(), T.BatchNorm1d(32), T.Linear(32, 5)),
                          gf.Model(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.BatchNorm(32), nn.Linear(32, 5)),
                                   inputs={"x": "f32[N,20]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy),
                          T.functional.cross_entropy, rng.normal(size=(8, 20)), rng.integers(0, 5, 8)),
        "embedding_layernorm": (TorchEmbed(), gf.Model(Embed(), inputs={"ids": "i64[N,7]"}, targets={"t": "f32[N,3]"},
                                                       loss=F.mse_loss),
                                T.functional.mse_loss, rng.integers(0, 50, (8, 7)), rng.normal(size=(8, 3))),
        "attention": (TorchAttention(), gf.Model(Attention(), inputs={"x": "f32[N,6,16]"}, targets={"y": "i64[N]"},
                                                 loss=F.cross_entropy),
                      T.functional.cross_entropy, rng.normal(size=(8, 6, 16)), rng.integers(0, 5, 8)),
    }


def _randomise(torch, module):
    """Non-trivial norm parameters, biases and running statistics (PyTorch starts them at 1/0)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5 if name.endswith("norm.weight")
                        or name == "2.weight" else torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)


def _worst(ours, theirs) -> float:
    """The largest difference relative to the largest magnitude of all of them together."""
    scale = max(float(np.abs(v).max()) for v in theirs.values())
    return max(float(np.abs(np.asarray(ours[k]) - np.asarray(v)).max()) for k, v in theirs.items()) / scale


CASES = ["mlp_batchnorm", "embedding_layernorm", "attention"]


@pytest.mark.parametrize("case", CASES)
def test_pytorch_weights_give_pytorch_outputs_gradients_and_sgd_step(case, kernel_cache):
    """A PyTorch module's state_dict through from_pytorch: in eval mode the same predictions (f64
    and f32 compiles); in training mode (BatchNorm on batch statistics) the same loss, the same
    gradient of every parameter (gradfuse's backward graph in float64, reference interpreter), the
    same parameters and running statistics after one SGD step of the compiled f64 program; and
    the weights go back into the PyTorch module (strict) through to_pytorch."""
    torch = _torch()
    torch.manual_seed(0)
    module, model, torch_loss, x, y = _cases(torch)[case]
    module = module.double()
    _randomise(torch, module)
    model.load_state_dict(gf.from_pytorch(module.state_dict(), model))
    compiled = gf.compile(model, dtype="f64", cache_dir=kernel_cache)

    module.eval()
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert _worst({"y": compiled.predict(x)}, {"y": want}) < 1e-12  # measured ~3e-16
    inference = gf.Model(model.net, inputs=model.inputs)  # no loss: no training program to compile
    inference.load_state_dict(model.initial_values())
    x32 = x.astype(np.float32) if x.dtype.kind == "f" else x
    assert _worst({"y": gf.compile(inference, cache_dir=kernel_cache).predict(x32)}, {"y": want}) < 1e-5  # ~1e-7

    module.train()
    loss = torch_loss(module(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    their_grads = gf.from_pytorch({n: p.grad for n, p in module.named_parameters()}, model, strict=False)
    forward = with_float(model.trace(train=True, with_loss=True), gf.DType.f64)
    joint = differentiate(forward)
    (x_name,), (y_name,) = model.inputs, model.targets
    feeds = {**model.initial_values("f64"), x_name: x, y_name: y}
    result = gf.interpret(joint.graph, feeds)
    our_grads = dict(zip(joint.grads, result.outputs[len(forward.outputs):], strict=True))
    params = {n for n, p in model.net.named_tensors() if not isinstance(p, nn.Buffer)}
    assert set(our_grads) == set(their_grads) == params
    assert abs(float(result.outputs[0]) - loss.item()) < 1e-12 * abs(loss.item())
    assert _worst(our_grads, their_grads) < 1e-12  # measured ~1e-15

    lr = 0.1
    with torch.no_grad():
        for p in module.parameters():
            p -= lr * p.grad
    step_loss = compiled.train_step(x, y, lr=lr)
    assert abs(step_loss - loss.item()) < 1e-12 * abs(loss.item())
    theirs = {k: v.numpy() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = gf.to_pytorch(compiled.state_dict(), model)
    assert set(ours) == set(theirs)
    assert _worst(ours, theirs) < 1e-12  # parameters after the step, running statistics after the batch

    module.load_state_dict(gf.to_pytorch(compiled.state_dict(), model, tensors=True))  # strict, PyTorch's side
