"""Random graphs compiled against the interpreter: small elementwise/reduction/matmul graphs,
and 20-node graphs mixing row ops, slices, concat, embedding, non-finite constants and two batch
symbols, each run at several sizes; plus the regression tests of the bugs they found."""

from __future__ import annotations

import os
import warnings

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from op_cases import with_nonfinite
from strategies import f32, graphs, mixed_graphs, random_feeds, run_both

import gradfuse as gf
from gradfuse.ir.graph import ArgKind, Graph, GraphBuilder
from gradfuse.ir.types import DType, TensorType
from gradfuse.passes.fusion import fuse
from gradfuse.runtime.program import Program


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: each step compiles
@given(g=graphs(max_nodes=6, annotate=False), seed=st.integers(0, 2**16))
def test_random_fused_graphs_compile_to_the_interpreters_numbers(g, seed, kernel_cache):
    """Each example compiles (about a second): few examples, small graphs. Operands like s - s
    make x / 0, so inf and nan must come out as numpy makes them."""
    fused_graph, _ = fuse(g, batch=3)
    prog = Program.compile(fused_graph, kernel_cache)
    ref, got, args = run_both(g, prog, random_feeds(g, batch=3, seed=seed))
    for v, want, out in zip(g.outputs, ref.outputs, got, strict=True):
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=f"%{v.name} of\n{fused_graph}")
    for name, want in ref.state.items():
        np.testing.assert_allclose(args[name], want, rtol=1e-5, atol=1e-5, err_msg=f"%{name} of\n{fused_graph}")


def test_an_updated_argument_that_is_also_an_output_comes_back_as_it_came_in(kernel_cache):
    """Found by the test above: state s updated to 2s and returned as s, the value before the step."""
    b = GraphBuilder("returns_updated_state")
    s = b.arg("s", f32(3), ArgKind.state)
    g = b.finish([s], updates=[(s, b.emit1("mul", s, b.emit1("const", attrs={"value": 2.0})))])
    prog = Program.compile(fuse(g, batch=3)[0], kernel_cache)
    for run in (prog.run, prog.run_checked):
        feeds = {"s": np.array([1.0, 2.0, 3.0], np.float32)}
        (out,) = run(feeds)
        np.testing.assert_array_equal(out, [1.0, 2.0, 3.0])
        np.testing.assert_array_equal(feeds["s"], [2.0, 4.0, 6.0])


# Mixed graphs (tests/strategies.py): up to 20 nodes of every fusion role (elementwise with
# broadcasts and comparisons, reductions, row ops, GEMM, slices, concat, broadcast_to, embedding),
# +-inf and NaN constants, inputs over N and over T. Compiling is the cost (~6 kernels an example,
# 0.12-0.17 s each: 50 examples took 39-47 s here); a run is ~1 ms, so each program runs at four
# (N, T) bindings, the last two with +-inf and NaN in every float argument, and run_checked too
# where nothing is non-finite. Several examples in one module (their disjoint union) measured no
# cheaper: Numba compiles each function on its own (0.148 s a kernel in a union of 8 graphs, 0.118
# s in 8 modules). GRADFUSE_MIXED_EXAMPLES=600 (~8 min) searches longer; what it still finds, about
# once in 600: a reduction or row kernel reassociates its fused elementwise work (fast-math
# 'reassoc', which vectorises the accumulation), so (x + m) - x gives m where numpy's x = inf gives NaN.
MIXED_EXAMPLES = int(os.environ.get("GRADFUSE_MIXED_EXAMPLES", "50"))
MIXED_SIZES = st.fixed_dictionaries({"N": st.sampled_from([1, 2, 3, 5]), "T": st.sampled_from([1, 2, 4])})


def in_float64(g: Graph) -> Graph:
    """``g`` computed in float64: every f32 argument, constant and cast f64 (names kept)."""
    def wide(t: TensorType) -> TensorType:
        return t.with_dtype(DType.f64) if t.dtype is DType.f32 else t

    b = GraphBuilder(g.name)
    new = {v: b.arg(v.name, wide(v.type), kind, exact=True) for kind, v in g.args}
    for n in g.nodes:
        attrs = {k: DType.f64 if a is DType.f32 else a for k, a in n.attrs.items()}
        outs = b.emit(n.op, [new[v] for v in n.inputs], attrs, names=[v.name for v in n.outputs])
        new.update(zip(n.outputs, outs, strict=True))
    return b.finish([new[v] for v in g.outputs], [(new[old], new[v]) for old, v in g.updates])


def assert_close(got: np.ndarray, want: np.ndarray, what: str, exact: np.ndarray | None = None) -> None:
    """Same dtype and shape; integers and booleans equal, floats within 1e-5 (NaN where NaN).
    ``exact``: the value in float64. Where the float32 reference itself is that far from it (a
    layer_norm of a row whose variance is ~eps: the reference's rounded mean, not the kernel's,
    is off by 2e-5), a kernel no further from it than the reference passes too."""
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: got {got.dtype}{list(got.shape)}, the interpreter gives {want.dtype}{list(want.shape)}"
    if want.dtype.kind not in "fc":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    rtol = atol = 1e-5
    bad = ~np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    if exact is not None and bad.any():
        g64, w64, e64 = (np.asarray(a, np.float64) for a in (got, want, exact))
        off = np.abs(w64 - e64)  # the reference's own error
        bad &= ~(np.isfinite(w64) & np.isfinite(e64) & (np.abs(g64 - e64) <= off + atol + rtol * np.abs(e64)))
    if bad.any():
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=what + (
            "" if exact is None else f"\n(float64: {np.asarray(exact)[bad][:5]} where the kernel differs)"))


def with_nonfinite_args(g: Graph, feeds: dict, seed: int) -> dict:
    """``feeds`` with a few elements of every float argument replaced by +inf, -inf and NaN."""
    rng = np.random.default_rng(seed)
    names = [v.name for _, v in g.args]
    return dict(zip(names, with_nonfinite([feeds[n] for n in names], rng, shift=seed), strict=True))


@settings(max_examples=MIXED_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
          phases=[Phase.explicit, Phase.generate])  # no shrinking: each step compiles
@given(g=mixed_graphs(max_nodes=20), sizes=st.lists(MIXED_SIZES, min_size=4, max_size=4), seed=st.integers(0, 2**16))
def test_random_mixed_graphs_compile_to_the_interpreters_numbers(g, sizes, seed, kernel_cache):
    fused_graph, _ = fuse(g, batch=3)
    prog = Program.compile(fused_graph, kernel_cache)
    wide = in_float64(g)
    for i, bound in enumerate(sizes):
        nonfinite = i >= 2
        feeds = random_feeds(g, seed=seed + i, sizes=bound)
        if nonfinite:
            feeds = with_nonfinite_args(g, feeds, seed + i)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's mean of an empty slice (a slice [1:1])
            ref, got, args = run_both(g, prog, feeds)
            exact = gf.interpret(wide, {k: a.astype(np.float64) if a.dtype == np.float32 else a
                                        for k, a in feeds.items()})
        at = f" at {', '.join(f'{k}={v}' for k, v in bound.items())}{' (inf and nan fed)' if nonfinite else ''}"
        runs = [("", got, args)]
        if all(np.isfinite(a).all() for a in ref.env.values() if a.dtype.kind == "f"):
            checked = {k: np.copy(a) for k, a in feeds.items()}  # nothing to stop at: the kernel-by-kernel
            runs.append((", run_checked,", prog.run_checked(checked), checked))  # path gives the same
        for how, outs, updated in runs:
            for v, want, out, e in zip(g.outputs, ref.outputs, outs, exact.outputs, strict=True):
                assert_close(out, want, f"%{v.name}{at}{how} of\n{fused_graph}", e)
            for name, want in ref.state.items():
                assert_close(updated[name], want, f"update of %{name}{at}{how} of\n{fused_graph}", exact.state[name])


def test_an_update_whose_new_value_is_also_an_output_is_applied(kernel_cache):
    """Found by the mixed graphs: p <- 2p with 2p also returned. The memory plan wrote 2p into p's
    storage (the update in place, so no copy at the end) while the runtime gave the output an
    array of its own: p kept its old value. A graph output takes no argument's storage now."""
    b = GraphBuilder("update_is_an_output")
    p = b.arg("p", f32(3), ArgKind.param)
    new = b.emit1("mul", p, b.scalar(2.0, DType.f32))
    g = b.finish([new], updates=[(p, new)])
    prog = Program.compile(fuse(g, batch=3)[0], kernel_cache)
    for run in (prog.run, prog.run_checked):
        feeds = {"p": np.array([1.0, 2.0, 3.0], np.float32)}
        (out,) = run(feeds)
        np.testing.assert_array_equal(out, [2.0, 4.0, 6.0])
        np.testing.assert_array_equal(feeds["p"], [2.0, 4.0, 6.0])
        assert not np.shares_memory(out, feeds["p"])


def test_softmax_along_an_empty_axis_gives_an_empty_result(kernel_cache):
    """Found by the mixed graphs: softmax and log_softmax along an axis of size 0 (a slice [1:1])
    made the reference raise (np.max over nothing has no identity without initial=-inf)."""
    b = GraphBuilder("empty_rows")
    x = b.arg("x", f32("N", 3))
    empty = b.emit1("slice", x, attrs={"axis": 1, "start": 1, "stop": 1, "step": 1})
    g = b.finish([b.emit1(op, empty, attrs={"axis": 1}) for op in ("softmax", "log_softmax")])
    prog = Program.compile(fuse(g, batch=3)[0], kernel_cache)
    ref, got, _ = run_both(g, prog, {"x": np.ones((2, 3), np.float32)})
    for want, out in zip(ref.outputs, got, strict=True):
        assert want.shape == out.shape == (2, 0) and want.dtype == out.dtype == np.float32


def test_an_elementwise_kernel_keeps_inf_minus_inf_a_nan(kernel_cache):
    """Found by the mixed graphs: x + (x - x) came out as x, so inf where numpy's inf - inf gives
    NaN: fast-math reassociation, which only accumulating kernels need, is off in the others."""
    b = GraphBuilder("x_plus_x_minus_x")
    x = b.arg("x", f32("N"))
    g = b.finish([b.emit1("add", x, b.emit1("sub", x, x))])
    prog = Program.compile(fuse(g, batch=3)[0], kernel_cache)
    assert [k.kind for k in prog.kernels.kernels] == ["elementwise"]
    ref, (got,), _ = run_both(g, prog, {"x": np.array([np.inf, -np.inf, np.nan, 1.5], np.float32)})
    np.testing.assert_array_equal(got, ref.outputs[0])
    np.testing.assert_array_equal(got, [np.nan, np.nan, np.nan, 1.5])


# ---- 5. the examples' training steps ----------------------------------------------------------
# digits_mlp with SGD + momentum is the very program gf.compile builds for the runtime tests (compiled
# once per session); the bigger two take Adam, whose graph adds pow, sqrt and division by state


def test_arithmetic_fused_into_a_reduction_is_not_reassociated(kernel_cache):
    """(x + m) - x is NaN at x = inf in numpy; compiled with fast-math's 'reassoc' LLVM made it m.
    The kernels are compiled without it (their sums accumulate through a function that has it),
    so the sum of the row and the row's log-softmax statistics see the NaN."""
    b = GraphBuilder("no_reassociation")
    x, m = b.arg("x", f32("N", 8), exact=True), b.arg("m", f32("N", 8), exact=True)
    d = b.emit1("sub", b.emit1("add", x, m, hint="xm"), x, hint="d")
    outs = [b.emit1("sum", d, attrs={"axes": [1]}, hint="s"), b.emit1("log_softmax", d, attrs={"axis": 1}, hint="ls")]
    g, _ = fuse(b.finish(outs), batch=4)
    prog = Program.compile(g, kernel_cache)
    assert "accumulate_f32(" in prog.source and "'reassoc'" not in prog.source.split("def accumulate_f32")[1]
    xs = np.ones((4, 8), np.float32)
    xs[1, 3] = np.inf
    ms = np.full((4, 8), 0.5, np.float32)
    ref, got, _ = run_both(g, prog, {"x": xs, "m": ms})
    for v, want, out in zip(g.outputs, ref.outputs, got, strict=True):
        assert np.isnan(want[1]).all() and not np.isnan(want[0]).any(), v.name
        np.testing.assert_allclose(out, want, rtol=1e-6, equal_nan=True, err_msg=v.name)
