"""The Numba CPU backend against the reference interpreter.

Numba compiles each kernel in 0.1-0.9 s, so nothing here compiles a module per case: the op
table is ONE graph holding every case of tests/op_cases.py as independent nodes (one kernel each),
the fused scenarios a second graph, and each example's training step one program; every test
then checks its own slice of the results.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import pytest
from op_cases import (
    CASES,
    CONFIDENT,
    SYMBOL_SIZES,
    bindings_for,
    confident_logits,
    cross_entropy_f64,
    has_float_operand,
    make_inputs,
    with_nonfinite,
)
from scipy import special
from strategies import f32, run_both

import gradfuse as gf
from gradfuse.codegen import blas
from gradfuse.codegen.cpu import PARALLEL_ELEMENTS
from gradfuse.codegen.kernel_ir import Kernel
from gradfuse.ir.graph import ArgKind, Graph, GraphBuilder, Value
from gradfuse.ir.ops.random import counter_uniform
from gradfuse.ir.registry import all_ops
from gradfuse.ir.types import DType, TensorType
from gradfuse.passes.fusion import fuse
from gradfuse.passes.manager import run_pipeline
from gradfuse.passes.optimizer import SGD, Adam
from gradfuse.runtime.program import Program
from gradfuse.stages import training_step

# (rtol, atol) by dtype; integers and booleans compare exactly
TOLERANCE = {DType.f32: (1e-5, 1e-6), DType.f64: (1e-12, 1e-12)}
# looser only where the formula, not the code, sets the error:
LOOSER = {
    # dx = (dx̂ - mean dx̂ - x̂ mean(dx̂ x̂)) / σ cancels to 0 when a feature has one row (N=1): the
    # rounding of dx̂ (FMA-contracted under fastmath) comes back multiplied by 1/σ = 1/sqrt(eps) ≈ 316
    ("batch_norm_train_grad", DType.f32): (1e-5, 1e-4),
    ("layer_norm_grad", DType.f32): (1e-5, 1e-4),
}


def assert_matches(got: np.ndarray, want: np.ndarray, op: str, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: got {got.dtype}{list(got.shape)}, the interpreter gives {want.dtype}{list(want.shape)}"
    dtype = DType.of(want.dtype)
    if not dtype.is_float:
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    rtol, atol = LOOSER.get((op, dtype), TOLERANCE[dtype])
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


# ---- 1. every op, every case of the op table, one compile -------------------------------------
TABLE = [(op, i, c) for op in sorted(CASES) for i, c in enumerate(CASES[op])]


def table_graph() -> tuple[Graph, dict[tuple[str, int], tuple[Value, ...]]]:
    """Every case as its own node over its own arguments ``%op.i.xj``; ``%_N`` binds N for the
    cases that use it only in attributes (a const of shape [N,3])."""
    b = GraphBuilder("op_table")
    b.arg("_N", TensorType(DType.f32, ("N",)), exact=True)
    outs = {}
    for op, i, c in TABLE:
        args = [b.arg(f"{op}.{i}.x{j}", t, exact=True) for j, t in enumerate(c.types)]
        outs[op, i] = b.emit(op, args, c.attrs, hint=f"{op}.{i}")
    return b.finish([v for vs in outs.values() for v in vs]), outs


def table_feeds(n: int, nonfinite: bool = False) -> dict[str, np.ndarray]:
    """The cases' inputs at N=n; with ``nonfinite``, a few elements of every float operand are
    +inf, -inf and NaN (op_cases.with_nonfinite)."""
    feeds = {"_N": np.zeros(n, np.float32)}
    for op, i, c in TABLE:
        arrays = make_inputs(c, {"N": n}, np.random.default_rng(i))
        if nonfinite and has_float_operand(c):
            arrays = with_nonfinite(arrays, np.random.default_rng(1000 + i), shift=i)
        feeds.update({f"{op}.{i}.x{j}": a for j, a in enumerate(arrays)})
    return feeds


@dataclass
class Results:
    graph: Graph
    outputs: dict  # what each case / scenario returns
    program: Program
    values: dict[int, dict[Value, tuple[np.ndarray, np.ndarray]]]  # N -> value -> (interpreter, compiled)


@pytest.fixture(scope="module", autouse=True)
def compiled_here():
    """Kernels compiled in this process, none by a compile worker (runtime/compile_workers.py):
    code loaded from Numba's cache has no types to inspect (float64_temporaries)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADFUSE_COMPILE_WORKERS", "0")
        yield


@pytest.fixture(scope="module")
def op_table(kernel_cache) -> Results:
    g, outputs = table_graph()
    prog = Program.compile(g, kernel_cache)  # ~190 kernels: about 30 s
    values = {}
    for n in SYMBOL_SIZES:
        ref, got, _ = run_both(g, prog, table_feeds(n))
        values[n] = {v: (want, out) for v, want, out in zip(g.outputs, ref.outputs, got, strict=True)}
    return Results(g, outputs, prog, values)


def _table_params():
    for op, i, c in TABLE:
        for b in bindings_for(c):
            assert set(b) <= {"N"}, "the op table binds one symbol, N"
            yield pytest.param(op, i, b.get("N", SYMBOL_SIZES[-1]),
                               id=f"{op}-{i}" + "".join(f"-{k}={v}" for k, v in b.items()))


@pytest.mark.parametrize(("op", "index", "n"), list(_table_params()))
def test_op_lowering_matches_the_interpreter(op_table, op, index, n):
    for v in op_table.outputs[op, index]:
        want, got = op_table.values[n][v]
        assert_matches(got, want, op, f"{op} case {index} at N={n}: %{v.name}")


@pytest.fixture(scope="module")
def op_table_nonfinite(op_table) -> dict[int, dict[Value, tuple[np.ndarray, np.ndarray]]]:
    """The op table's program (compiled once, for op_table) run again on inputs holding +inf,
    -inf and NaN; the reference's warnings on them (overflow, invalid) are expected."""
    values = {}
    for n in SYMBOL_SIZES:
        with np.errstate(all="ignore"):
            ref, got, _ = run_both(op_table.graph, op_table.program, table_feeds(n, nonfinite=True))
        values[n] = {v: (want, out) for v, want, out in zip(op_table.graph.outputs, ref.outputs, got, strict=True)}
    return values


@pytest.mark.parametrize(("op", "index", "n"), [p for p in _table_params()
                                                if has_float_operand(CASES[p.values[0]][p.values[1]])])
def test_op_lowering_matches_the_interpreter_on_inf_and_nan(op_table, op_table_nonfinite, op, index, n):
    """Every float case again, a few elements of each float operand +inf, -inf and NaN: the
    kernels give what numpy gives (NaN where numpy's is NaN, the same infinities)."""
    for v in op_table.outputs[op, index]:
        want, got = op_table_nonfinite[n][v]
        assert_matches(got, want, op, f"{op} case {index} at N={n} with inf/NaN inputs: %{v.name}")


def test_every_registered_op_is_lowered(op_table):
    """Each op runs in a kernel of its own, except reshape: a view in the step function."""
    in_kernels = {nd.op for k in op_table.program.kernels.kernels for nd in k.nodes}
    assert in_kernels | {"reshape"} == set(all_ops())
    assert all(len(k.nodes) == 1 for k in op_table.program.kernels.kernels)


def test_every_op_record_says_how_each_backend_lowers_it():
    """From the records alone (no kernel printed): every op has a fusion role, and what its role
    needs on every registered backend: a scalar expression, a combine and identity, or a template
    the backend knows. A fake op without them is caught."""
    from gradfuse.codegen.cpu import missing_lowering
    from gradfuse.ir.registry import ROLES, OpDef

    missing = {name: why for name, op in all_ops().items() if (why := missing_lowering(op))}
    assert missing == {}
    assert all(op.role in ROLES for op in all_ops().values())
    fakes = [OpDef("fake", "structured", None, None, 1, role="row", lowering={"template": "nowhere"}),
             OpDef("fake", "elementwise", None, None, 1), OpDef("fake", "reduction", None, None, 1)]
    assert all(missing_lowering(op) for op in fakes)


def test_dropout_mask_is_the_reference_mask_exactly(op_table):
    for n in SYMBOL_SIZES:
        for i in range(len(CASES["dropout"])):
            (v,) = op_table.outputs["dropout", i]
            want, got = op_table.values[n][v]
            np.testing.assert_array_equal(got == 0, want == 0, err_msg=f"dropout case {i} at N={n}")
    x = op_table.values[3][op_table.outputs["dropout", 0][0]][1]
    assert 0 < (x == 0).mean() < 1  # p=0.5 over 48 elements: both kinds are present


def float64_temporaries(prog: Program, k: Kernel) -> list[str]:
    """Numba's float64 variables in a kernel, except literals before their f32(...) conversion
    (``$const``, ``__vconst`` once a helper is inlined, ``np.inf`` negated): the mark of float32
    math promoted to float64."""
    literal = ("$const", "__vconst", "load_attr", "unary_negative")
    out = []
    for cres in getattr(prog.module, k.name).overloads.values():
        out += [name for name, t in cres.type_annotation.typemap.items()
                if t == numba.types.float64 and not any(mark in name for mark in literal)]
    return out


def float32_math(results: Results) -> dict[str, tuple[list[str], list[str]]]:
    """Kernels without float64 tensors that compute in float64 anyway: name -> (ops, variables)."""
    single = [k for k in results.program.kernels.kernels  # (an all-reduce is a call of the step, not a kernel)
              if all(v.type.dtype is not DType.f64 for nd in k.nodes for v in (*nd.inputs, *nd.outputs))
              and hasattr(results.program.module, k.name)]
    assert len(single) > 10
    return {k.name: ([nd.op for nd in k.nodes], names) for k in single
            if (names := float64_temporaries(results.program, k))}


def test_float32_kernels_compute_in_float32(op_table):
    assert not float32_math(op_table)


# ---- 2. fused kernels: chains, prologues, epilogues, GEMM epilogues ---------------------------
@dataclass(frozen=True)
class Scenario:
    """A small subgraph over its own arguments (named ``name.*``); ``kind`` and ``parts`` are what
    the kernel computing ``anchor`` (an output name) must be, so coverage cannot silently vanish
    when the fusion rules change."""

    name: str
    build: Callable[[Callable, Callable], list[Value]]  # (arg, emit) -> outputs
    anchor: str
    kind: str
    parts: tuple[str, ...] = ()  # of prologue, epilogue, finale


def _chain(arg, emit):
    x, w, s, k, c = arg("x", f32("N", 4)), arg("w", f32(4)), arg("s", f32()), arg("k", f32("N", 1)), \
        arg("c", TensorType(DType.bool, (4,)))
    a = emit("add", emit("mul", x, w), s, name="a")
    t = emit("tanh", a)
    g = emit("sigmoid", emit("mul", t, k))
    e = emit("where", c, emit("gelu", a, approximate="tanh"), g)
    r = emit("leaky_relu", emit("sub", e, emit("exp", emit("neg", emit("abs", a)))), alpha=0.1)
    return [a, emit("maximum", emit("relu", r), emit("mul", e, emit("const", value=0.5)), name="out")]


def _ints_and_bools(arg, emit):
    i, j, f = arg("i", TensorType(DType.i32, ("N", 3))), arg("j", TensorType(DType.i32, (3,))), arg("f", f32("N", 3))
    m = emit("gt", emit("cast", i, dtype="f32"), f)
    q = emit("logical_or", m, emit("lt", i, j))
    w = emit("where", q, i, j)
    big = emit("mul", emit("cast", w, dtype="i64"), emit("const", value=3, dtype="i64"))
    return [emit("cast", w, dtype="f64"), emit("logical_not", emit("cast", f, dtype="bool")),
            emit("abs", big, name="out")]


def _dropout_chain(arg, emit):
    x, step = arg("x", f32("N", 64)), arg("step", TensorType(DType.i64, ()))
    d = emit("dropout", emit("mul", emit("relu", x), emit("const", value=2.0)), step, p=0.3, seed=5, stream=1,
             name="mask")
    return [d, emit("add", d, emit("const", value=1.0), name="out")]


def _sum_trailing(arg, emit):
    x = arg("x", f32("N", 4, 5))
    return [emit("log", emit("sum", emit("exp", emit("mul", x, emit("const", value=0.5))), axes=[2]), name="out")]


def _mean_leading(arg, emit):
    x = arg("x", f32("N", 4, 5))
    m = emit("mean", emit("mul", x, x), axes=[0], keepdims=True)
    return [emit("sqrt", emit("add", m, emit("const", value=1e-3)), name="out")]


def _max_mixed(arg, emit):
    x = arg("x", f32("N", 4, 5))
    m = emit("max", emit("abs", x), axes=[0, 2], keepdims=True)
    return [emit("mul", m, emit("const", value=2.0), name="out")]


def _sum_all_over_count(arg, emit):
    x, w = arg("x", f32("N", 4, 5)), arg("w", f32(4))
    n = emit("count", x, axes=[0, 1, 2])
    mean = emit("div", emit("sum", emit("sub", x, emit("const", value=1.0)), axes=[0, 1, 2]), n, name="out")
    return [mean, emit("div", w, emit("count", x, axes=[0]), name="per_row")]  # N only through a count


def _int_and_f64_sums(arg, emit):
    i, d = arg("i", TensorType(DType.i32, ("N", 3))), arg("d", TensorType(DType.f64, ("N", 3, 2)))
    s = emit("sum", emit("mul", i, emit("const", value=2, dtype="i32")), axes=[1], keepdims=True)
    return [emit("add", s, emit("const", value=1, dtype="i32"), name="out"),
            emit("tanh", emit("sum", emit("sigmoid", d), axes=[1]))]


def _softmax_rows(arg, emit):
    h, scale, mask = arg("h", f32("N", 3, 6)), arg("scale", f32()), arg("mask", f32(6))
    hs = emit("add", emit("mul", h, scale), mask)
    p = emit("softmax", hs, axis=2, name="p")
    return [emit("mul", p, h), emit("mul", p, hs, name="out")]  # the epilogue reads a prologue value


def _log_softmax_middle_axis(arg, emit):
    z = arg("z", f32("N", 5, 4))
    lp = emit("log_softmax", emit("add", z, emit("const", value=1.0)), axis=1, name="lp")
    return [emit("mul", lp, emit("const", value=2.0), name="out")]


def _softmax_two_axes(arg, emit):
    """Two row ops over different axes of one tensor: a pass each, through the whole-tensor path."""
    x = emit("add", arg("x", f32("N", 4)), emit("const", value=1.0))
    p = emit("softmax", x, axis=0, name="p")
    return [emit("mul", p, emit("log_softmax", x, axis=1), name="out")]


def _layer_norm_residual(arg, emit):
    x, r, gamma, beta = arg("x", f32("N", 3, 8)), arg("r", f32("N", 3, 8)), arg("gamma", f32(8)), arg("beta", f32(8))
    y = emit("layer_norm", emit("add", x, r), gamma, beta, name="y")
    return [emit("add", emit("gelu", y, approximate="tanh"), x, name="out")]


def _gelu_layer_norm(arg, emit):
    """No epilogue: the row is made, and normalised, in the output's own row."""
    x, gamma, beta = arg("x", f32("N", 3, 8)), arg("gamma", f32(8)), arg("beta", f32(8))
    return [emit("layer_norm", emit("gelu", x, approximate="tanh"), gamma, beta, name="y")]


def _softmax_of_sum(arg, emit):
    a, b = arg("a", f32("N", 6)), arg("b", f32(6))
    return [emit("softmax", emit("add", a, b), axis=1, name="p")]


def _cross_entropy_rows(arg, emit):
    """Big (2^20 elements at the nominal N=256), with its loss reduction."""
    z, bias = arg("z", f32("N", 64, 64)), arg("bias", f32(64))
    y, g = arg("y", TensorType(DType.i64, ("N", 64))), arg("g", f32())
    logits = emit("add", z, bias)
    loss = emit("softmax_cross_entropy", logits, y, name="loss")
    half = emit("mul", loss, emit("const", value=0.5), name="half_loss")  # forward, before the backward
    grad = emit("softmax_cross_entropy_grad", logits, y, g)
    return [half, emit("mul", grad, emit("const", value=2.0), name="out")]


def _cross_entropy_loss_only(arg, emit):
    z, bias, y = arg("z", f32("N", 5)), arg("bias", f32(5)), arg("y", TensorType(DType.i64, ("N",)))
    loss = emit("softmax_cross_entropy", emit("add", z, bias), y, name="loss")
    return [emit("mul", loss, emit("const", value=0.5), name="out")]


def _gemm_bias_relu(arg, emit):
    x, w, b = arg("x", f32("N", 8)), arg("w", f32(8, 5)), arg("b", f32(5))
    mm = emit("matmul", x, w, name="mm")
    return [emit("relu", emit("add", mm, b), name="out")]


def _attention(arg, emit):
    q, k, v = arg("q", f32("N", 2, 3, 4)), arg("k", f32("N", 2, 3, 4)), arg("v", f32("N", 2, 3, 4))
    s = emit("mul", emit("matmul", q, k, transpose_b=True, name="scores"), emit("const", value=0.5))
    p = emit("softmax", s, axis=3)
    return [s, emit("matmul", p, v, name="out")]


def _folded_gemm(arg, emit):
    h, w, b = arg("h", f32("N", 3, 4)), arg("w", f32(4, 5)), arg("b", f32(5))
    return [emit("add", emit("matmul", h, w, name="mm"), b, name="out")]


def _gemm_transpose_a_update(arg, emit):
    x, g, p, lr = arg("x", f32("N", 4)), arg("g", f32("N", 5)), arg("p", f32(4, 5)), arg("lr", f32())
    dw = emit("matmul", x, g, transpose_a=True, name="dw")
    return [emit("sub", p, emit("mul", lr, dw), name="out")]


def _mse_prologue(arg, emit):
    p, t = arg("p", f32("N", 4)), arg("t", f32("N", 4))
    loss = emit("mse", emit("relu", p), t, name="loss")
    return [emit("mul", loss, emit("const", value=2.0), name="out")]


def _mse_and_grad(arg, emit):
    """Both read the predictions: one kernel, two whole-tensor templates."""
    p, t, g = arg("p", f32("N", 4)), arg("t", f32("N", 4)), arg("g", f32())
    half = emit("mul", emit("mse", p, t, name="loss"), emit("const", value=0.5))
    return [half, emit("mul", emit("mse_grad", p, t, g), emit("const", value=3.0), name="out")]


def _batch_norm_prologue(arg, emit):
    x = arg("x", f32("N", 2, 6))
    gamma, beta, mean, var = (arg(k, f32(6)) for k in ("gamma", "beta", "mean", "var"))
    shifted = emit("add", emit("mul", x, emit("const", value=2.0)), emit("const", value=1.0))
    y, new_mean, new_var = emit("batch_norm_train", shifted, gamma, beta, mean, emit("abs", var), momentum=0.2,
                                name="y")
    return [emit("relu", y, name="out"), new_mean, new_var]


def _layer_norm_grad_prologue(arg, emit):
    x, gamma, g = arg("x", f32("N", 8)), arg("gamma", f32(8)), arg("g", f32("N", 8))
    return list(emit("layer_norm_grad", x, gamma, emit("mul", g, emit("const", value=2.0)), name="dx"))


def _division_by_zero(arg, emit):
    """inf and nan as numpy makes them, not Numba's default ZeroDivisionError."""
    x, y = arg("x", f32("N", 3)), arg("y", f32(3))
    zero = emit("sub", y, y)  # +0 (fastmath ignores the sign of zero: no y * 0)
    return [emit("div", x, zero, name="out"), emit("log", emit("abs", zero))]


def _sum_of_a_constant(arg, emit):
    c = emit("const", value=2.5)
    return [emit("sum", c, axes=[], name="out"), emit("reshape", c, shape=[1, 1]), c]


SCENARIOS = [
    Scenario("chain", _chain, "out", "elementwise", ("epilogue",)),
    Scenario("ints_and_bools", _ints_and_bools, "out", "elementwise", ("epilogue",)),
    Scenario("dropout", _dropout_chain, "out", "elementwise", ("epilogue",)),
    Scenario("sum_trailing", _sum_trailing, "out", "reduction", ("prologue", "epilogue")),
    Scenario("mean_leading", _mean_leading, "out", "reduction", ("prologue", "epilogue")),
    Scenario("max_mixed", _max_mixed, "out", "reduction", ("prologue", "epilogue")),
    Scenario("sum_all_over_count", _sum_all_over_count, "out", "reduction", ("prologue", "epilogue")),
    Scenario("int_and_f64_sums", _int_and_f64_sums, "out", "reduction", ("prologue", "epilogue")),
    Scenario("softmax_rows", _softmax_rows, "p", "row", ("prologue", "epilogue")),
    Scenario("log_softmax_middle_axis", _log_softmax_middle_axis, "lp", "row", ("prologue", "epilogue")),
    Scenario("softmax_two_axes", _softmax_two_axes, "p", "row", ("prologue", "epilogue")),
    Scenario("layer_norm_residual", _layer_norm_residual, "y", "row", ("prologue", "epilogue")),
    Scenario("gelu_layer_norm", _gelu_layer_norm, "y", "row", ("prologue",)),
    Scenario("softmax_of_sum", _softmax_of_sum, "p", "row", ("prologue",)),
    Scenario("cross_entropy_rows", _cross_entropy_rows, "loss", "row", ("prologue", "epilogue", "finale")),
    Scenario("cross_entropy_loss_only", _cross_entropy_loss_only, "loss", "row", ("prologue", "finale")),
    Scenario("gemm_bias_relu", _gemm_bias_relu, "mm", "gemm", ("epilogue",)),
    Scenario("attention", _attention, "scores", "gemm", ("epilogue",)),
    Scenario("folded_gemm", _folded_gemm, "mm", "gemm", ("epilogue",)),
    Scenario("gemm_transpose_a_update", _gemm_transpose_a_update, "dw", "gemm", ("epilogue",)),
    Scenario("mse_prologue", _mse_prologue, "loss", "row", ("prologue", "finale")),
    Scenario("mse_and_grad", _mse_and_grad, "loss", "row", ("epilogue", "finale")),
    Scenario("batch_norm_prologue", _batch_norm_prologue, "y", "row", ("prologue", "epilogue")),
    Scenario("layer_norm_grad_prologue", _layer_norm_grad_prologue, "dx", "row", ("prologue",)),
    Scenario("division_by_zero", _division_by_zero, "out", "elementwise", ("epilogue",)),
    Scenario("sum_of_a_constant", _sum_of_a_constant, "out", "reduction"),
]


def scenarios_graph(scenarios=SCENARIOS, name="fused_scenarios") -> tuple[Graph, dict[str, list[str]]]:
    """The scenarios in one graph, and the names of each scenario's outputs."""
    b = GraphBuilder(name)
    outputs, names = [], {}
    for sc in scenarios:
        def arg(name, t, sc=sc):
            return b.arg(f"{sc.name}.{name}", t, exact=True)

        def emit(op, *inputs, name=None, sc=sc, **attrs):
            outs = b.emit(op, inputs, attrs, hint=f"{sc.name}.{name or op}")
            return outs if len(outs) > 1 else outs[0]

        mine = sc.build(arg, emit)
        names[sc.name] = [v.name for v in mine]
        outputs += mine
    return b.finish(outputs), names


def scenario_feeds(g: Graph, n: int) -> dict[str, np.ndarray]:
    """Standard normal floats, fair booleans, small signed ints; labels in range and the dropout
    step (``.step``) in [0, 1000)."""
    classes = {nd.inputs[1]: nd.inputs[0].type.shape[-1] for nd in g.nodes if nd.op.startswith("softmax_cross")}
    rng = np.random.default_rng(n)
    feeds = {}
    for _, v in g.args:
        shape, dt = v.type.concrete({"N": n}), v.type.dtype
        if dt is DType.bool:
            feeds[v.name] = rng.random(shape) < 0.5
        elif dt.is_int:
            low, high = (0, classes[v]) if v in classes else (0, 1000) if v.name.endswith(".step") else (-5, 6)
            feeds[v.name] = rng.integers(low, high, shape).astype(dt.np)
        else:
            feeds[v.name] = rng.standard_normal(shape).astype(dt.np)
    return feeds


@pytest.fixture(scope="module")
def fused(kernel_cache) -> Results:
    unfused, outputs = scenarios_graph()
    g, _ = fuse(unfused, batch=256)
    prog = Program.compile(g, kernel_cache)  # ~30 kernels: about 10 s
    values = {}
    for n in SYMBOL_SIZES:
        ref, got, _ = run_both(g, prog, scenario_feeds(g, n))
        values[n] = {v: (want, out) for v, want, out in zip(g.outputs, ref.outputs, got, strict=True)}
    return Results(g, outputs, prog, values)


def kernel_of(prog: Program, value: str) -> Kernel:
    return next(k for k in prog.kernels.kernels if any(v.name == value for nd in k.nodes for v in nd.outputs))


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda sc: sc.name)
def test_fused_scenario_matches_the_interpreter(fused, sc):
    k = kernel_of(fused.program, f"{sc.name}.{sc.anchor}")
    assert k.kind == sc.kind
    present = tuple(p for p in ("prologue", "epilogue", "finale") if getattr(k, p) is not None)
    assert present == sc.parts, f"kernel {k.name} has {present}, the scenario wants {sc.parts}"
    for n in SYMBOL_SIZES:
        for v in map(fused.graph.value, fused.outputs[sc.name]):
            want, got = fused.values[n][v]
            assert_matches(got, want, fused.graph.producers()[v].op, f"{sc.name} at N={n}: %{v.name}")


def test_gemms_fall_back_to_np_dot_without_numpys_openblas(kernel_cache, monkeypatch):
    """Where numpy bundles no OpenBLAS (built against MKL, Accelerate), GEMMs print as np.dot."""
    monkeypatch.setattr(blas, "AVAILABLE", False)
    g, _ = fuse(scenarios_graph([sc for sc in SCENARIOS if sc.kind == "gemm"], "np_dot_gemms")[0], batch=256)
    prog = Program.compile(g, kernel_cache)
    assert "np.dot(" in prog.source and "blas_gemm" not in prog.source
    ref, got, _ = run_both(g, prog, scenario_feeds(g, 3))
    for v, want, out in zip(g.outputs, ref.outputs, got, strict=True):
        assert_matches(out, want, "matmul", f"%{v.name}")


@pytest.mark.parametrize("name", ["gelu_layer_norm.y", "softmax_of_sum.p"])
def test_a_row_op_without_epilogue_works_in_its_output_row(fused, name):
    """Its prologue writes the row into the output's own row (no row buffer), which the op then
    overwrites; the scenario test above checks the numbers."""
    k = kernel_of(fused.program, name)
    code = fused.program.source.split(f"\ndef {k.name}(")[1].split("\ndef ")[0]
    out = "b_" + name.replace(".", "_")
    assert "np.empty(" not in code and re.search(rf"{out}\[[^]]*\] = v_", code) and f" = {out}[" in code, code


def test_fused_float32_kernels_compute_in_float32(fused):
    assert not float32_math(fused)


def test_dropout_mask_in_a_fused_kernel_is_the_reference_mask(fused):
    for n in SYMBOL_SIZES:
        want, got = fused.values[n][fused.graph.value("dropout.mask")]
        np.testing.assert_array_equal(got == 0, want == 0)


def test_cross_entropy_keeps_a_confident_models_small_loss(kernel_cache):
    """The row kernel's loss on float32 rows with losses 1e-4..1e-7 (largest logit 5 or 30), in
    batches and row by row: within 2e-6 relative of float64, where float32 itself sets the limit
    (each x_j - m rounds: |x_j - m| · 2^-24 ≈ 1e-6 at a gap of 17; fast_exp adds up to 4.5 ulp).
    Measured: 6e-7 at most. ``m + log(sumexp) - x[label]`` gave 4e-3 at 1e-5 and 1.0 at 1e-7."""
    b = GraphBuilder("confident_xent")
    for c in (10, 1000):
        z, y = b.arg(f"z{c}", f32("N", c), exact=True), b.arg(f"y{c}", TensorType(DType.i64, ("N",)), exact=True)
        b.emit1("softmax_cross_entropy", z, y, hint=f"loss{c}")
    g, _ = fuse(b.finish([n.outputs[0] for n in b.nodes]), batch=64)
    prog = Program.compile(g, kernel_cache)
    rng = np.random.default_rng(0)
    for loss, top in CONFIDENT:
        for c, rows in ((10, 64), (1000, 64), (10, 1), (1000, 1)):
            z, labels = confident_logits(rng, rows, c, loss, top)
            other = 1010 - c  # the other node's logits and labels: zeros
            feeds = {f"z{c}": z, f"y{c}": labels, f"z{other}": np.zeros((rows, other), np.float32),
                     f"y{other}": np.zeros(rows, np.int64)}
            got = float(prog.run(feeds)[c == 1000])
            want = cross_entropy_f64(z, labels)
            assert abs(got - want) <= 2e-6 * want, (c, rows, loss, top, got, want)


# ---- 3. the scalar library: approximations over a wide range, the counter hash ---------------
WIDE = np.concatenate([np.linspace(-20, 20, 801), [0.0, 1e-30, -1e-30, 1e-7, -1e-7, 1e-4, -1e-4, 1e-2, -1e-2]])
EXACT = {  # float64 truth for each op
    "exp": np.exp,
    "tanh": np.tanh,
    "sigmoid": special.expit,
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "gelu_none": lambda x: x * special.ndtr(x),
}


@pytest.fixture(scope="module")
def approximations(kernel_cache):
    """exp, tanh, sigmoid and both gelu forms over WIDE, in f32 and f64: one elementwise kernel per
    dtype; and exp at the ends of float32's range."""
    b = GraphBuilder("approximations")
    outs = []
    for dt in (DType.f32, DType.f64):
        x = b.arg(f"x{dt}", TensorType(dt, (len(WIDE),)), exact=True)
        for name in EXACT:
            op, attrs = ("gelu", {"approximate": name[5:]}) if name.startswith("gelu") else (name, {})
            outs.append(b.emit1(op, x, attrs=attrs, hint=f"{name}.{dt}"))
    ends = b.arg("ends", TensorType(DType.f32, (len(EXP_ENDS),)), exact=True)
    outs.append(b.emit1("exp", ends, hint="exp_ends"))
    g, _ = fuse(b.finish(outs))
    prog = Program.compile(g, kernel_cache)
    got = prog.run({"xf32": WIDE.astype(np.float32), "xf64": WIDE, "ends": EXP_ENDS})
    return {v.name: a for v, a in zip(g.outputs, got, strict=True)}


EXP_ENDS = np.array([-np.inf, -1e4, -87.5, -87.3, -86.0, -1e-7, 0.0, 1e-7, 88.0, 88.72, 88.73, 1e4, np.inf, np.nan],
                    np.float32)


def test_fast_exp_at_the_ends_of_the_float32_range(approximations):
    """inf above 88.72, NaN stays NaN, within 5 ulp elsewhere; results below 2^-125 may flush to 0."""
    got = approximations["exp_ends"]
    with np.errstate(over="ignore"):
        want = np.exp(EXP_ENDS.astype(np.float64))
    tiny = want < 2.0 ** -125
    assert np.all(got[tiny] <= want[tiny])
    finite = ~tiny & (want <= np.finfo(np.float32).max)
    ulps = np.abs(got[finite] - want[finite]) / np.spacing(want[finite].astype(np.float32))
    assert ulps.max() <= 5, ulps
    assert np.all(np.isinf(got[want > np.finfo(np.float32).max])) and np.isnan(got[-1])


@pytest.mark.parametrize("name", list(EXACT))
def test_fast_approximations_are_accurate_over_a_wide_range(approximations, name):
    x32 = WIDE.astype(np.float32).astype(np.float64)
    got32 = approximations[f"{name}.f32"].astype(np.float64)
    # f32: Eigen's rational tanh is ~1e-7 absolute; near 0 it keeps its relative accuracy
    np.testing.assert_allclose(got32, EXACT[name](x32), rtol=2e-6, atol=1e-6)
    tiny = np.abs(x32) < 1e-3
    np.testing.assert_allclose(got32[tiny], EXACT[name](x32[tiny]), rtol=1e-5, atol=1e-37)
    if name in ("exp", "sigmoid", "gelu_tanh"):  # through fast_exp: relative accuracy where the value is small
        want = EXACT[name](x32)
        big = np.abs(want) > 1e-6
        np.testing.assert_allclose(got32[big], want[big], rtol=5e-6)
    # f64 uses libm's tanh: full precision
    np.testing.assert_allclose(approximations[f"{name}.f64"], EXACT[name](WIDE), rtol=1e-13, atol=1e-15)
    assert np.all(np.abs(approximations["tanh.f32"]) <= 1)


def test_scalar_counter_hash_is_the_numpy_one():
    """The helper the kernels inline, run as plain Python ints, draws the reference's numbers."""
    from gradfuse.codegen.scalar_lib import counter_uniform as scalar_uniform

    for seed, stream, step in [(0, 0, 0), (-7, 2, 999), (2**40 + 3, 5, 123456789)]:
        want = counter_uniform(seed, stream, step, (37,))
        got = [scalar_uniform(seed, stream, step, i) for i in range(37)]
        np.testing.assert_array_equal(np.float32(got), want)


# ---- 4. random fused graphs -------------------------------------------------------------------
EXAMPLES = [("digits_mlp", SGD(momentum=0.9)), ("residual_mlp", Adam()), ("digits_attention", Adam())]
LR = 0.05


@pytest.fixture(scope="module")
def example_steps(example_model, kernel_cache):
    """name -> (training-step graph, its compiled fused program, feeds at batch 4). Compiling takes
    about 7 s (MLP), 12 s (residual) and 25 s (attention) here."""
    out = {}
    for name, optimizer in EXAMPLES:
        model = example_model(name)
        step = training_step(model, optimizer)
        data = model.data()
        feeds = {"x": data["x_train"][:4], "y": data["y_train"][:4], "lr": np.float32(LR),
                 **model.initial_values(), **step.new_state}
        for kind, v in step.graph.args:  # e.g. the dropout step counter
            if v.name not in feeds:
                assert kind is not ArgKind.input, f"{name}: no feed for input %{v.name}"
                feeds[v.name] = np.full(v.type.concrete({}), 3, v.type.dtype.np)
        fused_graph = run_pipeline(step.graph, "simplify,fuse").graph
        prog = Program.compile(fused_graph, kernel_cache)
        prog.run({k: np.copy(v) for k, v in feeds.items()})  # Numba compiles on the first call
        out[name] = (step.graph, prog, feeds)
    return out


def assert_update_matches(got: np.ndarray, want: np.ndarray, before: np.ndarray, adam_m: np.ndarray | None,
                          what: str) -> None:
    """An updated param or state, to absolute tolerances: a bias feeding BatchNorm (and the key
    bias of attention) has a gradient that is 0 in exact arithmetic, so both sides hold rounding
    noise there. Adam's first step moves a param by lr·g/(|g| + eps), a coin toss where g is
    noise: such params are compared where |g| > 1e-5 and bounded by lr everywhere; the moments
    m = 0.1 g and v = 0.001 g² are compared everywhere, to 1e-6 in g."""
    if adam_m is not None:
        assert np.all(np.abs(got - before) <= LR * (1 + 1e-5)), f"{what}: an Adam step larger than lr"
        sure = np.abs(adam_m) > 1e-6
        got, want = got[sure], want[sure]
    atol = 1e-7 if what.endswith(".adam_m") else 1e-9 if what.endswith(".adam_v") else 1e-6
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol, err_msg=what)


@pytest.mark.parametrize("name", [name for name, _ in EXAMPLES])
def test_example_training_step_matches_the_interpreter(example_steps, name):
    g, prog, feeds = example_steps[name]
    ref, got, args = run_both(g, prog, feeds)
    np.testing.assert_allclose(got[0], ref.outputs[0], rtol=1e-5, err_msg=f"{name}: loss")
    for v, want, out in zip(g.outputs[1:], ref.outputs[1:], got[1:], strict=True):
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5, err_msg=f"{name}: %{v.name}")
    assert ref.state, f"{name}: the step updates nothing"
    for key, want in ref.state.items():
        adam_m = ref.state.get(f"{key}.adam_m")
        assert_update_matches(args[key], want, feeds[key], adam_m, f"{name}: updated %{key}")


def test_large_batches_agree_with_the_interpreter(kernel_cache):
    """A row kernel, an elementwise chain and a reduction over 2^21 elements, where the step runs
    the kernels' parallel twins (codegen/cpu.py: PARALLEL_ELEMENTS), and over a few."""
    b = GraphBuilder("big")
    z = b.arg("z", f32("N", 64, 64))
    y = b.arg("y", TensorType(DType.i64, ("N", 64)))
    e = b.emit1("tanh", b.emit1("mul", z, z))
    loss = b.emit1("softmax_cross_entropy", z, y)
    s = b.emit1("sum", e, attrs={"axes": [2]})
    g = fuse(b.finish([loss, e, s]), batch=256)[0]
    prog = Program.compile(g, kernel_cache)
    assert "prange(" in prog.source
    rng = np.random.default_rng(0)
    for n in (PARALLEL_ELEMENTS // (64 * 64), 3):
        feeds = {"z": rng.standard_normal((n, 64, 64), dtype=np.float32), "y": rng.integers(0, 64, (n, 64))}
        ref = gf.interpret(g, feeds).outputs
        for got, want in zip(prog.run(feeds), ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
