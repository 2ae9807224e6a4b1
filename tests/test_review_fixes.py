"""Regressions from review: two batch symbols in one memory plan, the reference and the kernels
agreeing on an empty max, the fusion report naming the producer, non-finite constants end to end,
and multi-input models run by name and through an artifact."""

import numpy as np
import pytest

import gradfuse as gf
from gradfuse import functional as F
from gradfuse import nn
from gradfuse.errors import InputError
from gradfuse.ir.graph import GraphBuilder
from gradfuse.ir.parser import parse_graph
from gradfuse.ir.types import DType, TensorType
from gradfuse.passes.fusion import fuse
from gradfuse.passes.memory import plan_memory
from gradfuse.passes.planned import run_planned
from gradfuse.runtime import artifact
from gradfuse.runtime.program import Program


def randn(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- 1. one size per batch symbol ---------------------------------------------------------------
class TwoLengths(nn.Module):
    """Inputs of two symbolic lengths, N and T, each through its own layer, joined by a sum."""

    def __init__(self):
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)

    def forward(self, x, t):
        return F.sum(self.a(x), axis=0) + F.sum(F.relu(self.b(t)), axis=0)


TWO_LENGTHS = gf.Model(TwoLengths(), inputs={"x": "f32[N,8]", "t": "f32[T,8]"})


@pytest.fixture(scope="module")
def two_lengths(kernel_cache):
    return gf.compile(TWO_LENGTHS, cache_dir=kernel_cache)


@pytest.mark.parametrize(("n", "t"), [(3, 5), (7, 2), (1, 1), (4, 4)])
def test_two_symbolic_dims_run_at_their_own_sizes(two_lengths, n, t):
    x, s = randn((n, 8), seed=n), randn((t, 8), seed=10 + t)
    want = gf.interpret(TWO_LENGTHS.trace(), {"x": x, "t": s, **TWO_LENGTHS.initial_values()}).outputs[0]
    np.testing.assert_allclose(two_lengths.predict(x, s), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(two_lengths.predict(t=s, x=x), want, rtol=1e-5, atol=1e-5)


def test_the_memory_plan_takes_one_size_per_symbol():
    g = TWO_LENGTHS.trace()
    plan = plan_memory(g, sizes={"N": 3, "T": 5})
    assert plan.sizes == {"N": 3, "T": 5} and plan.batch is None
    assert "(sizes N=3, T=5)" in plan.render().splitlines()[0]
    assert not plan.overlaps()
    by_value = {v.name: v for v in g.values()}
    for p in plan.values.values():  # every buffer is sized for its own symbols
        assert p.nbytes == by_value[p.value].type.nbytes({"N": 3, "T": 5})
    feeds = {"x": randn((3, 8)), "t": randn((5, 8), seed=1), **TWO_LENGTHS.initial_values()}
    np.testing.assert_allclose(run_planned(g, plan, feeds).outputs[0], gf.interpret(g, feeds).outputs[0], rtol=1e-6)
    with pytest.raises(InputError, match="the memory plan is for N=3, T=5, fed T=4"):
        run_planned(g, plan, {**feeds, "t": randn((4, 8))})
    same = plan_memory(g, batch=6)  # one size for every symbol: the common case
    assert same.batch == 6 and same.sizes == {"N": 6, "T": 6}
    assert "(batch N=6)" in same.render().splitlines()[0]


# ---- 3. max over an empty axis ------------------------------------------------------------------
def test_max_over_an_empty_axis_is_the_identity_in_both(kernel_cache):
    b = GraphBuilder("empty_max")
    x = b.arg("x", TensorType(DType.f32, ("N", 0)), exact=True)
    i = b.arg("i", TensorType(DType.i32, ("N", 0, 2)), exact=True)
    outs = [*b.emit("max", [x], {"axes": [1]}), *b.emit("max", [i], {"axes": [1]}),
            *b.emit("max", [i], {"axes": [0, 1], "keepdims": True})]
    g = b.finish(outs)
    feeds = {"x": np.zeros((3, 0), np.float32), "i": np.zeros((3, 0, 2), np.int32)}
    want = [np.full(3, -np.inf, np.float32), np.full((3, 2), np.iinfo(np.int32).min, np.int32),
            np.full((1, 1, 2), np.iinfo(np.int32).min, np.int32)]
    ref = gf.interpret(g, feeds).outputs
    got = Program.compile(g, kernel_cache).run(feeds)
    for w, r, c in zip(want, ref, got, strict=True):
        np.testing.assert_array_equal(r, w)
        np.testing.assert_array_equal(c, w)
        assert r.dtype == c.dtype == w.dtype


def test_max_reference_still_propagates_nan():
    from gradfuse.ir.registry import get_op

    x = np.array([[1.0, np.nan, 3.0], [-np.inf, -np.inf, -np.inf]], np.float32)
    (y,) = get_op("max").run_ref([x], {"axes": (1,), "keepdims": False})
    np.testing.assert_array_equal(y, np.array([np.nan, -np.inf], np.float32))


# ---- 4. the fusion report names the producer ----------------------------------------------------
def test_the_fusion_report_names_the_producer_not_the_first_anchor():
    """%e (mul) is the epilogue of softmax's kernel and %g the second anchor of a shared row pass:
    what a later reduction reads is theirs, not the kernel's first anchor's."""
    g = parse_graph("""\
func @g(
    input %x: f32[N,6],
    input %z: f32[N,5],
    input %y: i64[N],
    input %w: f32[],
) {
  %p: f32[N,6] = softmax %x {axis=1}
  %e: f32[N,6] = mul %p, %p
  %s: f32[N] = sum %e {axes=[1]}
  %loss: f32[] = softmax_cross_entropy %z, %y
  %g: f32[N,5] = softmax_cross_entropy_grad %z, %y, %w
  %b: f32[5] = sum %g {axes=[0]}
  return %s, %loss, %b
}
""")
    fused, report = fuse(g)
    why = {(p.outputs[0].name, c.outputs[0].name): text for p, c, text in report.rejected}
    assert why["e", "s"] == "sum reduces the output of mul %e, which ends the kernel: an epilogue is elementwise"
    assert why["g", "b"] == ("sum reduces the output of softmax_cross_entropy_grad %g, which ends the kernel: "
                             "an epilogue is elementwise")


# ---- 2. a non-finite constant end to end ---------------------------------------------------------
class MaskedSoftmax(nn.Module):
    """The usual attention mask: -inf where masked, so softmax gives those positions 0."""

    def forward(self, x, keep):
        return F.softmax(F.where(keep > 0, x, float("-inf")), axis=-1)


def test_a_minus_inf_mask_constant_compiles_and_matches_the_interpreter(kernel_cache):
    model = gf.Model(MaskedSoftmax(), inputs={"x": "f32[N,6]", "keep": "f32[N,6]"})
    compiled = gf.compile(model, cache_dir=kernel_cache)
    x = randn((4, 6))
    keep = (np.random.default_rng(3).random((4, 6)) < 0.6).astype(np.float32)
    keep[:, 0] = 1
    keep[1] = 0  # a row masked everywhere: softmax of all -inf is NaN, in numpy as in the kernel
    with np.errstate(invalid="ignore"):
        want = gf.interpret(model.trace(), {"x": x, "keep": keep}).outputs[0]
    got = compiled.predict(x=x, keep=keep)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    rows = [0, 2, 3]
    assert np.all(got[rows][keep[rows] == 0] == 0) and np.all(got[rows][keep[rows] == 1] > 0)
    np.testing.assert_allclose(got[rows].sum(axis=1), 1, rtol=1e-6)
    assert np.isnan(got[1]).all()
    assert "-np.inf" in compiled.predict_program.source and "(-inf)" not in compiled.predict_program.source


EDGES = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 4.0, -1.0]


@pytest.mark.parametrize("dtype", [DType.f32, DType.f64])
def test_kernels_give_numpys_values_at_zero_inf_and_nan(kernel_cache, dtype):
    """What the op table's random inf/NaN positions may miss: rsqrt at ±0 and at a denormal
    (fast-math's rsqrt estimate gave NaN and -inf), and maximum/minimum/max with NaN in either
    place (Python's max dropped it). The sign of a NaN is not compared."""
    b = GraphBuilder(f"edges_{dtype.value}")
    t = TensorType(dtype, (len(EDGES),))
    x, y = b.arg("x", t, exact=True), b.arg("y", t, exact=True)
    outs = [*b.emit("rsqrt", [x], {}), *b.emit("maximum", [x, y], {}), *b.emit("minimum", [x, y], {}),
            *b.emit("maximum", [y, x], {}), *b.emit("minimum", [y, x], {})]
    m = b.arg("m", TensorType(dtype, (len(EDGES), 2)), exact=True)
    outs += b.emit("max", [m], {"axes": [1]})
    g = b.finish(outs)
    xs = np.array(EDGES, dtype.np)
    ys = np.roll(xs, 3)
    feeds = {"x": xs, "y": ys, "m": np.stack([xs, ys], axis=1)}
    with np.errstate(all="ignore"):
        want = gf.interpret(g, feeds).outputs
        got = Program.compile(g, kernel_cache).run(feeds)
    for w, c, v in zip(want, got, g.outputs, strict=True):
        np.testing.assert_array_equal(c, w, err_msg=v.name)
        np.testing.assert_array_equal(np.signbit(c) | np.isnan(w), np.signbit(w) | np.isnan(w), err_msg=v.name)


# ---- 5. several inputs: by name, and through an artifact ----------------------------------------
class Gated(nn.Module):
    def __init__(self):
        self.value = nn.Linear(8, 4)
        self.gate = nn.Linear(8, 4)

    def forward(self, x, mask):
        return self.value(x) * F.sigmoid(self.gate(mask))


GATED = gf.Model(Gated(), inputs={"x": "f32[N,8]", "mask": "f32[N,8]"}, targets={"y": "f32[N,4]"},
                 loss=F.mse_loss)


@pytest.fixture(scope="module")
def gated(kernel_cache):
    return gf.compile(GATED, gf.SGD(momentum=0.9), cache_dir=kernel_cache)


def test_predict_and_train_step_take_inputs_by_name_or_position(gated):
    x, m, y = randn((5, 8)), randn((5, 8), seed=1), randn((5, 4), seed=2)
    want = gf.interpret(GATED.trace(), {"x": x, "mask": m, **GATED.initial_values()}).outputs[0]
    by_position = gated.predict(x, m)
    np.testing.assert_allclose(by_position, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gated.predict(mask=m, x=x), by_position)
    np.testing.assert_array_equal(gated.predict(x, mask=m), by_position)
    with pytest.raises(InputError, match="missing input 'mask'"):
        gated.predict(x=x)
    with pytest.raises(InputError, match=r"expected 2 array\(s\) \(x, mask\), got 1"):
        gated.predict(x)
    with pytest.raises(InputError, match=r"unknown input 'masks' \(it takes x, mask\)"):
        gated.predict(x=x, masks=m)
    with pytest.raises(InputError, match="'x' given by position and by name"):
        gated.predict(x, x=x, mask=m)
    with pytest.raises(InputError, match=r"expected 2 array\(s\) \(x, mask\), got 3"):
        gated.predict(x, m, m)
    with pytest.raises(InputError, match="missing input 'y'"):
        gated.train_step(x, mask=m, lr=0.1)
    twin = {k: v.copy() for k, v in gated.weights.items()}
    loss = gated.train_step(x=x, mask=m, y=y, lr=0.1)
    after = {k: v.copy() for k, v in gated.weights.items()}
    for k, v in twin.items():
        gated.weights[k][...] = v
    assert gated.train_step(x, m, y, lr=0.1) == loss
    for k, v in after.items():
        np.testing.assert_array_equal(gated.weights[k], v, err_msg=k)


def test_a_two_input_model_saves_and_loads_as_an_artifact(gated, two_lengths, tmp_path):
    x, m, y = randn((3, 8), seed=4), randn((3, 8), seed=5), randn((3, 4), seed=6)
    artifact.save(gated, str(tmp_path / "gated"))
    loaded = gf.load(str(tmp_path / "gated"))
    assert list(loaded.inputs) == ["x", "mask"] and list(loaded.targets) == ["y"]
    np.testing.assert_array_equal(loaded.predict(x=x, mask=m), gated.predict(x, m))
    before = {k: v.copy() for k, v in gated.weights.items()}
    loss = gated.train_step(x, m, y, lr=0.05)
    assert loaded.train_step(x=x, mask=m, y=y, lr=0.05) == loss
    for k in before:
        np.testing.assert_array_equal(loaded.weights[k], gated.weights[k], err_msg=k)
    artifact.save(two_lengths, str(tmp_path / "two_lengths"))  # two symbols: warmed up, saved, loaded
    again = gf.load(str(tmp_path / "two_lengths"))
    s = randn((6, 8), seed=7)
    np.testing.assert_array_equal(again.predict(x=x, t=s), two_lengths.predict(x, s))
