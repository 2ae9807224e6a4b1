"""The DSL end to end: every layer traced into IR and run by the reference interpreter, compared
with hand-written numpy forwards (tests/numpy_reference.py); value names, source locations,
initialisation, and Model."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import numpy_reference as ref
import pytest
from dsl_helpers import (
    BATCHES,
    MLP,
    TOL,
    ArgKind,
    DType,
    TensorType,
    Tower,
    check_layer,
    concrete,
    line,
    mlp_numpy,
    op_names,
    perturbed,
    randn,
    trace_fn,
)

import gradfuse as gf
from gradfuse import functional as F
from gradfuse import nn
from gradfuse.errors import InputError

HERE = os.path.basename(__file__)


# ==== 1. every layer equals its numpy forward ==================================================
@pytest.mark.parametrize("init", ["he", "xavier"])
def test_linear(init):
    net = nn.Linear(5, 3, init=init)
    check_layer(net, "f32[N,5]", lambda x, p: ref.linear(x, p["weight"], p["bias"]), out_type="f32[N,3]")
    check_layer(net, "f32[N,5]", lambda x, p: ref.linear(x, p["weight"], p["bias"]),
                params=perturbed(net.initial_values()))


def test_linear_without_bias_has_no_bias_argument():
    net = nn.Linear(5, 3, bias=False)
    g = check_layer(net, "f32[N,5]", lambda x, p: ref.linear(x, p["weight"]))
    assert [v.name for v in g.params] == ["weight"]
    assert op_names(g) == ["matmul"]


def test_linear_applies_to_the_last_axis_of_a_sequence():
    net = nn.Linear(4, 2)
    check_layer(net, "f32[N,3,4]", lambda x, p: ref.linear(x, p["weight"], p["bias"]),
                params=perturbed(net.initial_values()), out_type="f32[N,3,2]")


@pytest.mark.parametrize("layer, expected, op", [
    (nn.ReLU(), ref.relu, "relu"),
    (nn.Sigmoid(), ref.sigmoid, "sigmoid"),
    (nn.Tanh(), ref.tanh, "tanh"),
    (nn.LeakyReLU(0.2), lambda x: ref.leaky_relu(x, 0.2), "leaky_relu"),
    (nn.LeakyReLU(), lambda x: ref.leaky_relu(x, 0.01), "leaky_relu"),
    (nn.GELU(), ref.gelu_erf, "gelu"),
    (nn.GELU("tanh"), ref.gelu_tanh, "gelu"),
    (nn.Softmax(), ref.softmax, "softmax"),
    (nn.Softmax(axis=1), lambda x: ref.softmax(x, axis=1), "softmax"),
], ids=lambda v: repr(v) if isinstance(v, nn.Module) else None)
def test_activations(layer, expected, op):
    g = check_layer(layer, "f32[N,3,5]", lambda x, p: expected(x), out_type="f32[N,3,5]")
    assert op_names(g) == [op]


def test_gelu_forms_differ():
    """Both GELU forms are really implemented (the tanh form is an approximation)."""
    x = randn((1, 200), seed=3) * 3
    out = {}
    for approximate in ("none", "tanh"):
        g = gf.trace(nn.GELU(approximate), inputs={"x": "f32[N,200]"})
        out[approximate] = gf.interpret(g, {"x": x}).outputs[0]
    assert 0 < np.abs(out["none"] - out["tanh"]).max() < 1e-2


def test_softmax_rows_sum_to_one():
    g = gf.trace(nn.Softmax(), inputs={"x": "f32[N,7]"})
    y = gf.interpret(g, {"x": randn((3, 7)) * 30}).outputs[0]
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-6)


def test_flatten():
    g = check_layer(nn.Flatten(), "f32[N,8,8]", lambda x, p: x.reshape(len(x), 64), out_type="f32[N,64]")
    assert op_names(g) == ["reshape"]


def test_sequential():
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))

    def expected(x, p):
        return ref.linear(ref.relu(ref.linear(x, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])

    g = check_layer(net, "f32[N,6]", expected, out_type="f32[N,2]")
    check_layer(net, "f32[N,6]", expected, params=perturbed(net.initial_values()))
    assert [v.name for v in g.params] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_residual():
    net = nn.Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    check_layer(net, "f32[N,4]", lambda x, p: x + ref.tanh(ref.linear(x, p["block.0.weight"], p["block.0.bias"])),
                params=perturbed(net.initial_values()))


@pytest.mark.parametrize("in_type", ["f32[N,5]", "f32[N,3,5]"])
def test_layer_norm(in_type):
    net = nn.LayerNorm(5)

    def expected(x, p):
        return ref.layer_norm(x, p["weight"], p["bias"])

    check_layer(net, in_type, expected)
    check_layer(net, in_type, expected, params=perturbed(net.initial_values()))


@pytest.mark.parametrize("in_type, batches", [("f32[N,3]", (2, 3)), ("f32[N,4,3]", BATCHES)])
@pytest.mark.parametrize("perturb", [False, True], ids=["initial", "perturbed"])
def test_batch_norm_train_output_and_running_statistics(in_type, batches, perturb):
    """Batch statistics normalise; the running mean and (unbiased) variance are updated with
    momentum 0.1 and come back in Result.state."""
    net = nn.BatchNorm(3)
    g = gf.trace(net, inputs={"x": in_type}, train=True)
    assert [v.name for v in g.params] == ["weight", "bias"]
    assert [v.name for v in g.state] == ["running_mean", "running_var"]
    assert [old.name for old, _ in g.updates] == ["running_mean", "running_var"]
    params = perturbed(net.initial_values()) if perturb else net.initial_values()
    for n in batches:
        x = randn(concrete(in_type, n), seed=n) * 2 + 1
        res = gf.interpret(g, {"x": x, **params})
        y, mean, var = ref.batch_norm_train(x, *(params[k] for k in ("weight", "bias", "running_mean",
                                                                        "running_var")), momentum=0.1)
        np.testing.assert_allclose(res.outputs[0], y, **TOL)
        assert set(res.state) == {"running_mean", "running_var"}
        np.testing.assert_allclose(res.state["running_mean"], mean, **TOL)
        np.testing.assert_allclose(res.state["running_var"], var, **TOL)
        assert res.state["running_var"].dtype == np.float32


def test_batch_norm_momentum_is_configurable():
    net = nn.BatchNorm(2, momentum=0.5)
    g = gf.trace(net, inputs={"x": "f32[N,2]"}, train=True)
    x = randn((4, 2))
    res = gf.interpret(g, {"x": x, **net.initial_values()})
    _, mean, var = ref.batch_norm_train(x, np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), momentum=0.5)
    np.testing.assert_allclose(res.state["running_mean"], mean, **TOL)
    np.testing.assert_allclose(res.state["running_var"], var, **TOL)


def test_batch_norm_eval_uses_running_statistics_and_updates_nothing():
    net = nn.BatchNorm(3)
    g = gf.trace(net, inputs={"x": "f32[N,3]"}, train=False)
    assert op_names(g) == ["batch_norm_infer"]
    assert g.updates == []
    params = perturbed(net.initial_values())
    for n in BATCHES:
        x = randn((n, 3), seed=n)
        res = gf.interpret(g, {"x": x, **params})
        expected = ref.batch_norm_eval(x, params["weight"], params["bias"], params["running_mean"],
                                       params["running_var"])
        np.testing.assert_allclose(res.outputs[0], expected, **TOL)
        assert res.state == {}


def test_dropout_train_mask_scale_and_step_update():
    p = 0.25
    g = gf.trace(nn.Dropout(p), inputs={"x": "f32[N,400]"}, train=True, seed=11)
    assert [(v.name, str(v.type)) for v in g.state] == [("rng.step", "i64[]")]
    assert op_names(g).count("dropout") == 1
    x = randn((3, 400)) + 5.0  # never 0, so a zero output means dropped
    res = gf.interpret(g, {"x": x, "rng.step": np.int64(5)})
    y = res.outputs[0]
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)
    assert 0.2 < 1 - kept.mean() < 0.3
    # the mask is the documented counter-based draw for (model seed, stream 0, step)
    np.testing.assert_array_equal(kept, gf.ir.ops.random.counter_uniform(11, 0, 5, x.shape) >= np.float32(p))
    assert res.state["rng.step"] == 6 and res.state["rng.step"].dtype == np.int64
    # same step -> same mask; next step -> another mask
    again = gf.interpret(g, {"x": x, "rng.step": np.int64(5)}).outputs[0]
    np.testing.assert_array_equal(again, y)
    nxt = gf.interpret(g, {"x": x, "rng.step": res.state["rng.step"]}).outputs[0]
    assert not np.array_equal(nxt != 0, kept)
    # batch size 1 runs the same graph
    assert gf.interpret(g, {"x": x[:1], "rng.step": np.int64(5)}).outputs[0].shape == (1, 400)


def test_dropout_train_needs_the_step():
    g = gf.trace(nn.Dropout(0.5), inputs={"x": "f32[N,4]"}, train=True)
    with pytest.raises(InputError, match="rng.step"):
        gf.interpret(g, {"x": randn((2, 4))})


def test_two_dropouts_share_one_step_and_draw_different_masks():
    net = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5))
    g = gf.trace(net, inputs={"x": "f32[N,64]"}, train=True)
    assert [v.name for v in g.state] == ["rng.step"]
    assert [n.attrs["stream"] for n in g.nodes if n.op == "dropout"] == [0, 1]
    assert len(g.updates) == 1
    res = gf.interpret(g, {"x": np.ones((2, 64), np.float32), "rng.step": np.int64(0)})
    keep0, keep1 = (gf.ir.ops.random.counter_uniform(0, s, 0, (2, 64)) >= 0.5 for s in (0, 1))
    assert not np.array_equal(keep0, keep1)
    np.testing.assert_array_equal(res.env["0"], np.where(keep0, 2.0, 0.0))
    np.testing.assert_array_equal(res.outputs[0], np.where(keep0 & keep1, 4.0, 0.0))


def test_dropout_eval_is_the_identity_with_no_node():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    g = check_layer(net, "f32[N,4]", lambda x, p: ref.linear(x, p["0.weight"], p["0.bias"]), train=False)
    assert "dropout" not in op_names(g)
    assert g.state == [] and g.updates == []
    g = gf.trace(nn.Dropout(0.5), inputs={"x": "f32[N,4]"})
    assert g.nodes == [] and g.outputs == g.inputs


@pytest.mark.parametrize("id_dtype", ["i64", "i32"])
def test_embedding(id_dtype):
    net = nn.Embedding(10, 4)
    g = gf.trace(net, inputs={"ids": f"{id_dtype}[N,5]"})
    assert str(g.outputs[0].type) == "f32[N,5,4]"
    params = net.initial_values(seed=2)
    for n in BATCHES:
        ids = np.random.default_rng(n).integers(0, 10, (n, 5)).astype(DType[id_dtype].np)
        out = gf.interpret(g, {"ids": ids, **params}).outputs[0]
        np.testing.assert_array_equal(out, params["weight"][ids])


@pytest.mark.parametrize("dim", [6, 5])
def test_sinusoidal_positional_encoding_matches_the_paper(dim):
    net = nn.SinusoidalPositionalEncoding(max_len=16, dim=dim)
    values = net.initial_values()
    np.testing.assert_allclose(values["table"], ref.sinusoidal_encoding(16, dim), atol=1e-6)
    g = check_layer(net, f"f32[N,5,{dim}]", lambda x, p: x + ref.sinusoidal_encoding(16, dim)[:5])
    assert [(k, v.name) for k, v in g.args if v.name == "table"] == [(ArgKind.state, "table")]
    # the whole table: T == max_len
    check_layer(net, f"f32[N,16,{dim}]", lambda x, p: x + ref.sinusoidal_encoding(16, dim))


def test_learned_positional_encoding():
    net = nn.LearnedPositionalEncoding(max_len=8, dim=4)
    g = check_layer(net, "f32[N,3,4]", lambda x, p: x + p["table"][:3])
    assert [(k, v.name) for k, v in g.args if v.name == "table"] == [(ArgKind.param, "table")]
    assert net.initial_values()["table"].std() < 0.1


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_multi_head_self_attention(heads):
    net = nn.MultiHeadSelfAttention(6, heads)
    g = check_layer(net, "f32[N,4,6]", lambda x, p: ref.self_attention(x, p, "", heads), out_type="f32[N,4,6]")
    check_layer(net, "f32[N,4,6]", lambda x, p: ref.self_attention(x, p, "", heads),
                params=perturbed(net.initial_values()))
    assert [v.name for v in g.params] == [f"{m}.{t}" for m in "qkv" for t in ("weight", "bias")] + \
        ["out.weight", "out.bias"]


def test_attention_inside_a_model_uses_its_path():
    class Encoder(nn.Module):
        def __init__(self):
            self.attn = nn.MultiHeadSelfAttention(4, 2)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(x + self.attn(x))

    net = Encoder()

    def expected(x, p):
        return ref.layer_norm(x + ref.self_attention(x, p, "attn.", 2), p["norm.weight"], p["norm.bias"])

    check_layer(net, "f32[N,3,4]", expected, params=perturbed(net.initial_values()))


def test_mlp_on_images():
    net = MLP()
    check_layer(net, "f32[N,8,8]", mlp_numpy, out_type="f32[N,10]")


def test_tower_of_residual_blocks():
    net = Tower()

    def expected(x, p):
        for i in range(2):
            b = f"blocks.{i}."
            h = ref.layer_norm(x, p[b + "norm.weight"], p[b + "norm.bias"])
            x = x + ref.linear(h, p[b + "fc.weight"], p[b + "fc.bias"])
        return ref.linear(x, p["head.weight"], p["head.bias"])

    check_layer(net, "f32[N,8]", expected, params=perturbed(net.initial_values()))


# ==== 2. names =================================================================================
def test_parameters_are_arguments_named_by_path():
    g = gf.trace(MLP(), inputs={"x": "f32[N,8,8]"})
    assert [(k.value, v.name, str(v.type)) for k, v in g.args] == [
        ("input", "x", "f32[N,8,8]"),
        ("param", "fc1.weight", "f32[64,16]"),
        ("param", "fc1.bias", "f32[16]"),
        ("param", "fc2.weight", "f32[16,10]"),
        ("param", "fc2.bias", "f32[10]"),
    ]


def test_nested_paths():
    g = gf.trace(Tower(), inputs={"x": "f32[N,8]"})
    names = [v.name for v in g.params]
    assert names == [f"blocks.{i}.{m}.{t}" for i in (0, 1) for m in ("norm", "fc") for t in ("weight", "bias")] + \
        ["head.weight", "head.bias"]
    assert "blocks.0.norm.bias" in names


def test_sequential_attribute_names_its_layers_by_index():
    class Net(nn.Module):
        def __init__(self):
            self.layers = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

        def forward(self, x):
            return self.layers(x)

    g = gf.trace(Net(), inputs={"x": "f32[N,3]"})
    assert [v.name for v in g.params] == ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]
    assert set(Net().initial_values()) == {v.name for v in g.params}


def test_module_outputs_are_named_by_path():
    net = MLP()
    g = gf.trace(net, inputs={"x": "f32[N,8,8]"})
    producers = g.producers()
    assert producers[g.value("fc1")].op == "add"
    assert producers[g.value("act")].op == "relu"
    assert g.outputs[0].name == "fc2"
    text = str(g)
    assert "%fc1: f32[N,16] = add" in text and "%act: f32[N,16] = relu %fc1" in text
    # and the interpreter's env is keyed by those names
    params = net.initial_values()
    x = randn((3, 8, 8))
    env = gf.interpret(g, {"x": x, **params}).env
    np.testing.assert_allclose(env["fc1"], ref.linear(x.reshape(3, 64), params["fc1.weight"], params["fc1.bias"]),
                               **TOL)


def test_nested_module_outputs_are_named_by_path():
    g = gf.trace(Tower(), inputs={"x": "f32[N,8]"})
    producers = g.producers()
    assert producers[g.value("blocks.0.norm")].op == "layer_norm"
    assert producers[g.value("blocks.0.fc")].op == "add"
    assert producers[g.value("blocks.0")].scope == "blocks.0"
    assert g.outputs[0].name == "head"


def test_repeated_names_get_numeric_suffixes():
    g = trace_fn(lambda x: F.relu(F.relu(F.relu(x))), x="f32[N,3]")
    assert [v.name for n in g.nodes for v in n.outputs] == ["relu", "relu.1", "relu.2"]
    names = [v.name for v in g.values()]
    assert len(names) == len(set(names))


def test_module_called_twice_has_unique_names():
    class Twice(nn.Module):
        def __init__(self):
            self.fc1 = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc1(self.fc1(x))

    g = gf.trace(Twice(), inputs={"x": "f32[N,3]"})
    names = [v.name for v in g.values()]
    assert len(names) == len(set(names))
    assert [v.name for v in g.params] == ["fc1.weight", "fc1.bias"]
    assert ["fc1.matmul", "fc1", "fc1.matmul.1"] == names[3:6]


def test_module_called_twice_outputs_are_suffixed_paths():
    class Twice(nn.Module):
        def __init__(self):
            self.fc1 = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc1(self.fc1(x))

    g = gf.trace(Twice(), inputs={"x": "f32[N,3]"})
    assert g.outputs[0].name == "fc1.1"


def test_a_shared_module_has_one_set_of_parameters():
    class Tied(nn.Module):
        def __init__(self):
            self.a = nn.Linear(3, 3)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    net = Tied()
    g = gf.trace(net, inputs={"x": "f32[N,3]"})
    assert [v.name for v in g.params] == ["a.weight", "a.bias"]
    assert set(net.initial_values()) == {"a.weight", "a.bias"}


def test_printed_names_are_deterministic():
    text1 = str(gf.trace(Tower(), inputs={"x": "f32[N,8]"}))
    text2 = str(gf.trace(Tower(), inputs={"x": "f32[N,8]"}))
    assert text1 == text2
    model = gf.Model(MLP(), inputs={"x": "f32[N,8,8]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy)
    assert str(model.trace(with_loss=True)) == str(model.trace(with_loss=True))
    assert "0x" not in text1  # no addresses or ids
    assert "%blocks.0.norm.weight" in text1


def test_constants_are_shared_and_named_by_value():
    g = trace_fn(lambda x: (x + 1.0) * 1 - 2.5, x="f32[N,3]")
    consts = [n for n in g.nodes if n.op == "const"]
    assert len(consts) == 2  # 1.0 (used twice) and 2.5
    assert sorted(n.attrs["value"] for n in consts) == [1.0, 2.5]


# ==== 3. source locations ======================================================================
def test_nodes_carry_file_line_and_layer_scope():
    net = MLP()
    g = gf.trace(net, inputs={"x": "f32[N,8,8]"})
    where = os.path.basename(sys.modules[MLP.__module__].__file__)  # the file defining the model
    by_scope = {}
    for n in g.nodes:
        assert n.loc is not None and n.loc.file == where
        by_scope.setdefault(n.scope, set()).add(n.loc.line)
    assert by_scope == {"": {net.lines["flatten"]}, "fc1": {net.lines["fc1"]}, "act": {net.lines["act"]},
                        "fc2": {net.lines["fc2"]}}
    assert [n.scope for n in g.nodes if n.op == "matmul"] == ["fc1", "fc2"]
    assert f"# {where}:{net.lines['fc1']} @fc1" in str(g).replace("  ", " ")


def test_nested_scopes_and_the_line_of_the_trace_call_for_library_layers():
    g, at = gf.trace(nn.Sequential(nn.Linear(2, 2), nn.Residual(nn.LayerNorm(2))), inputs={"x": "f32[N,2]"}), line()
    assert [(n.op, n.scope) for n in g.nodes] == [("matmul", "0"), ("add", "0"), ("layer_norm", "1.block"),
                                                  ("add", "1")]
    assert {str(n.loc) for n in g.nodes} == {f"{HERE}:{at}"}


def test_functional_code_is_located_at_its_own_lines():
    lines = {}

    def fn(x):
        a, lines["mul"] = x * 2.0, line()
        b, lines["relu"] = F.relu(a), line()
        c, lines["sum"] = b.sum(axis=-1), line()
        return c

    g = trace_fn(fn, x="f32[N,3]")
    assert {n.op: n.loc.line for n in g.nodes if n.op != "const"} == lines
    assert {n.scope for n in g.nodes} == {""}


# ==== 4. initialisation ========================================================================
def test_initial_values_are_reproducible_from_the_seed():
    a, b, c = MLP().initial_values(seed=3), MLP().initial_values(seed=3), MLP().initial_values(seed=4)
    assert a.keys() == b.keys() == c.keys() == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == np.float32
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])
    # each tensor has its own stream: fc2's weight is not a prefix of fc1's draws
    assert not np.allclose(a["fc1.weight"].ravel()[:160] / a["fc1.weight"].std(),
                           a["fc2.weight"].ravel() / a["fc2.weight"].std())


def test_initial_values_do_not_depend_on_other_layers():
    class Small(nn.Module):
        def __init__(self):
            self.fc1 = nn.Linear(8, 4)

    class Big(nn.Module):
        def __init__(self):
            self.fc0 = nn.Linear(3, 8)
            self.fc1 = nn.Linear(8, 4)
            self.fc2 = nn.Linear(4, 2)

    np.testing.assert_array_equal(Small().initial_values(5)["fc1.weight"], Big().initial_values(5)["fc1.weight"])


def test_model_initial_values_use_the_model_seed():
    net = MLP()
    model = gf.Model(net, inputs={"x": "f32[N,8,8]"}, seed=9)
    np.testing.assert_array_equal(model.initial_values()["fc1.weight"], net.initial_values(9)["fc1.weight"])


def test_he_init_std():
    w = nn.Linear(2000, 400).initial_values()["weight"]
    assert w.shape == (2000, 400)
    assert abs(w.std() / math.sqrt(2 / 2000) - 1) < 0.01
    assert abs(w.mean()) < 0.01 * math.sqrt(2 / 2000)


def test_xavier_init_bound():
    w = nn.Linear(1000, 600, init="xavier").initial_values()["weight"]
    bound = math.sqrt(6 / 1600)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.99 * bound
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.01


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="he.*xavier"):
        nn.Linear(2, 2, init="zeros")


def test_biases_and_normalisation_start_neutral():
    v = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm(4)).initial_values(seed=1)
    np.testing.assert_array_equal(v["0.bias"], np.zeros(4, np.float32))
    np.testing.assert_array_equal(v["1.weight"], np.ones(4, np.float32))
    np.testing.assert_array_equal(v["1.bias"], np.zeros(4, np.float32))
    np.testing.assert_array_equal(v["2.weight"], np.ones(4, np.float32))
    np.testing.assert_array_equal(v["2.bias"], np.zeros(4, np.float32))
    np.testing.assert_array_equal(v["2.running_mean"], np.zeros(4, np.float32))
    np.testing.assert_array_equal(v["2.running_var"], np.ones(4, np.float32))



# ==== 7. Model =================================================================================
def test_model_trace_with_cross_entropy_loss():
    model = gf.Model(MLP(), inputs={"x": "f32[N,8,8]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy, seed=2)
    g = model.trace(with_loss=True)
    assert g.name == "mlp"
    assert [str(v.type) for v in g.outputs] == ["f32[]", "f32[N,10]"]
    assert [v.name for v in g.inputs] == ["x", "y"]
    params = model.initial_values()
    for n in BATCHES:
        x = randn((n, 8, 8), seed=n)
        y = np.random.default_rng(n).integers(0, 10, n)
        loss, pred = gf.interpret(g, {"x": x, "y": y, **params}).outputs
        np.testing.assert_allclose(pred, mlp_numpy(x, params), **TOL)
        np.testing.assert_allclose(loss, ref.cross_entropy(mlp_numpy(x, params), y), **TOL)
        assert loss.shape == () and loss.dtype == np.float32
    # without the loss: the prediction alone, and no target argument
    g = model.trace()
    assert [v.name for v in g.inputs] == ["x"] and len(g.outputs) == 1


def test_model_trace_with_mse_loss():
    net = nn.Sequential(nn.Linear(4, 8, init="xavier"), nn.Tanh(), nn.Linear(8, 2, init="xavier"))
    model = gf.Model(net, inputs={"x": "f32[N,4]"}, targets={"t": "f32[N,2]"}, loss=F.mse_loss, name="reg")
    g = model.trace(with_loss=True)
    assert g.name == "reg"
    params = model.initial_values()
    for n in BATCHES:
        x, t = randn((n, 4), seed=n), randn((n, 2), seed=10 + n)
        loss, pred = gf.interpret(g, {"x": x, "t": t, **params}).outputs
        want = ref.linear(ref.tanh(ref.linear(x, params["0.weight"], params["0.bias"])), params["2.weight"],
                          params["2.bias"])
        np.testing.assert_allclose(pred, want, **TOL)
        np.testing.assert_allclose(loss, ref.mse(want, t), **TOL)


def test_model_train_trace_carries_state_and_the_seed():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm(4), nn.Dropout(0.5))
    model = gf.Model(net, inputs={"x": "f32[N,4]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy, seed=5)
    g = model.trace(train=True, with_loss=True)
    assert [v.name for v in g.state] == ["1.running_mean", "1.running_var", "rng.step"]
    assert [n.attrs["seed"] for n in g.nodes if n.op == "dropout"] == [5]
    feeds = {"x": randn((3, 4)), "y": np.array([0, 1, 3]), "rng.step": np.int64(0), **model.initial_values()}
    res = gf.interpret(g, feeds)
    assert set(res.state) == {"1.running_mean", "1.running_var", "rng.step"}
    assert np.isfinite(res.outputs[0])
    assert "dropout" not in op_names(model.trace(train=False, with_loss=True))


def test_model_signature_accepts_tensor_types():
    model = gf.Model(nn.Linear(3, 2), inputs={"x": TensorType(DType.f32, ("N", 3))})
    assert str(model.trace().inputs[0].type) == "f32[N,3]"
