"""The CUDA backend in Numba's simulator: every op of the op table against the reference
interpreter, through the same loop nests as the CPU, printed as CUDA kernels (run with
``NUMBA_ENABLE_CUDASIM=1``, in a pytest process of its own: see tests/conftest.py)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from strategies import mixed_graphs, random_feeds, run_both
from test_codegen_cpu import TABLE, assert_matches, scenario_feeds, scenarios_graph, table_feeds, table_graph
from test_codegen_random import assert_close

from gradfuse.passes.fusion import fuse
from gradfuse.runtime.program import Program

# cudasim here and in CI (scripts/test.sh); on a GPU machine scripts/device_check.sh runs the same tests on the GPU
TARGET = os.environ.get("GRADFUSE_TEST_TARGET", "cudasim")
assert TARGET == "cuda" or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", \
    "run these with NUMBA_ENABLE_CUDASIM=1 (scripts/test.sh does), or GRADFUSE_TEST_TARGET=cuda on a GPU"

SIZES = (1, 3)
# the counter hash multiplies int64s that wrap on the device; the simulator's numpy says so
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in scalar multiply:RuntimeWarning")


@pytest.fixture(scope="module")
def sim_table(tmp_path_factory):
    g, outputs = table_graph()
    prog = Program.compile(g, str(tmp_path_factory.mktemp("kernels")), target=TARGET)
    values = {}
    for n in SIZES:
        ref, got, _ = run_both(g, prog, table_feeds(n))
        values[n] = {v: (want, out) for v, want, out in zip(g.outputs, ref.outputs, got, strict=True)}
    return outputs, values, prog


def _added_atomically(prog: Program, v) -> bool:
    """Whether ``v``'s kernel adds into it (scatter-add: cuda.atomic.add on the device), so that
    its float sums come in the order the threads happen to run, each run its own."""
    from gradfuse.codegen.collectives import is_host
    from gradfuse.codegen.loop_nests import Store, kernel_body, walk

    k = next((k for k in prog.kernels.kernels if v in k.writes), None)  # None: a view (reshape)
    if k is None or is_host(k):  # an all-reduce runs on the host
        return False
    return any(isinstance(s, Store) and s.add for s in walk(kernel_body(k)))


# float32 sums of up to ~30 terms of magnitude ~10 (the convolution gradients), rounded in any order
ATOMIC_F32 = {"rtol": 1e-5, "atol": 2e-5}


@pytest.mark.parametrize(("op", "index"), [(op, i) for op, i, _ in TABLE], ids=lambda x: str(x))
def test_cuda_lowering_matches_the_interpreter(sim_table, op, index):
    outputs, values, prog = sim_table
    for n in SIZES:
        for v in outputs[op, index]:
            want, got = values[n][v]
            what = f"{op} case {index} at N={n} on {TARGET}: %{v.name}"
            if want.dtype == np.float32 and _added_atomically(prog, v):
                np.testing.assert_allclose(np.asarray(got), want, equal_nan=True, err_msg=what, **ATOMIC_F32)
            else:
                assert_matches(np.asarray(got), want, op, what)


# ---- fused kernels: prologues, epilogues, row kernels sharing rows ---------------------------------
@pytest.fixture(scope="module")
def sim_scenarios(tmp_path_factory):
    unfused, outputs = scenarios_graph()
    g, _ = fuse(unfused, batch=256, target=TARGET)
    prog = Program.compile(g, str(tmp_path_factory.mktemp("kernels")), target=TARGET)
    values = {}
    for n in SIZES:
        ref, got, _ = run_both(g, prog, scenario_feeds(g, n))
        values[n] = list(zip(g.outputs, ref.outputs, got, strict=True))
    return values


def test_fused_scenarios_match_the_interpreter_on_cudasim(sim_scenarios):
    for n, triples in sim_scenarios.items():
        for v, want, got in triples:
            op = v.name.split(".")[-1]
            assert_matches(np.asarray(got), want, op, f"%{v.name} at N={n} on {TARGET}")


# ---- random fused graphs ------------------------------------------------------------------------
@settings(max_examples=int(os.environ.get("GRADFUSE_SIM_EXAMPLES", "25")), deadline=None, derandomize=True,
          database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(g=mixed_graphs(max_nodes=12), seed=st.integers(0, 2**16))
def test_random_fused_graphs_on_cudasim_match_the_interpreter(g, seed, tmp_path_factory):
    fused_graph, _ = fuse(g, batch=3, target=TARGET)
    prog = Program.compile(fused_graph, str(tmp_path_factory.getbasetemp() / "random"), target=TARGET)
    for i, bound in enumerate(({"N": 2, "T": 3}, {"N": 1, "T": 1})):
        feeds = random_feeds(g, seed=seed + i, sizes=bound)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref, got, args = run_both(g, prog, feeds)
        for v, want, out in zip(g.outputs, ref.outputs, got, strict=True):
            assert_close(np.asarray(out), want, f"%{v.name} at {bound} of\n{fused_graph}")
        for name, want in ref.state.items():
            assert_close(args[name], want, f"update of %{name} at {bound} of\n{fused_graph}")


# ---- training: the digits MLP takes the CPU's steps ---------------------------------------------
@pytest.fixture(scope="module")
def cpu_cache(tmp_path_factory):
    """One kernel cache for the CPU side of the digits comparisons: Numba compiles them once."""
    return str(tmp_path_factory.mktemp("cpu"))


def test_digits_mlp_trains_on_cudasim_as_on_the_cpu(example_model, tmp_path, cpu_cache):
    """Two SGD+momentum steps at batch 4: the losses and the weights of the CUDA kernels (in the
    simulator) within float32 tolerance of the CPU backend's. The weights stay in device memory:
    after the first step's upload, a step copies the batch and the learning rate across and the
    outputs back (the loss, the prediction), nothing else."""
    import gradfuse as gf
    from gradfuse.runtime.device import TRANSFERS

    model = example_model("digits_mlp")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int64)
    runs = {}
    for target in ("cpu", TARGET):
        cache = cpu_cache if target == "cpu" else str(tmp_path / target)
        compiled = gf.compile(model, gf.SGD(momentum=0.9), cache_dir=cache, target=target)
        losses = [float(compiled.train_step(x, y, lr=0.1))]
        before = TRANSFERS.copy()
        losses.append(float(compiled.train_step(x, y, lr=0.1)))
        if target == TARGET:
            outputs = len(compiled.train_program.graph.outputs)  # the loss, and the prediction for metrics
            assert TRANSFERS - before == {"to_device": 3, "to_host": outputs}, TRANSFERS - before
        runs[target] = losses, {k: np.copy(v) for k, v in compiled.weights.items()}
    (cpu_losses, cpu_weights), (sim_losses, sim_weights) = runs["cpu"], runs[TARGET]
    np.testing.assert_allclose(sim_losses, cpu_losses, rtol=1e-5)
    assert cpu_losses[1] < cpu_losses[0]
    for name, w in cpu_weights.items():
        np.testing.assert_allclose(sim_weights[name], w, rtol=1e-4, atol=1e-6, err_msg=name)


# ---- warp shuffles: the GPU's block reductions, in the simulator ------------------------------------
class _Warps:
    """``cuda.shfl_down_sync`` and ``cuda.shfl_sync`` for the simulator, which has none: the
    lanes of a warp of ``LANES`` threads exchange values through the block (every thread of the
    block calls them, as the printed reductions do), with the hardware's rule that a lane reading
    past the warp's end gets its own value."""

    LANES = 4

    def _exchange(self, value, source):
        me = self.threadIdx.x
        board = self.__dict__.setdefault("_board", {})
        board[me] = value
        self.syncthreads()
        src = source(me)
        got = board[src] if src // self.LANES == me // self.LANES else value
        self.syncthreads()
        return got

    def shfl_down_sync(self, mask, value, delta):
        return self._exchange(value, lambda me: me + delta)

    def shfl_sync(self, mask, value, lane):
        return self._exchange(value, lambda me: me - me % self.LANES + lane)


@pytest.fixture
def simulated_warps(monkeypatch):
    if TARGET != "cudasim":
        pytest.skip("a GPU has warps of its own: every other test here runs its shuffles")
    from numba.cuda.simulator import kernelapi

    for name in ("_exchange", "shfl_down_sync", "shfl_sync"):
        monkeypatch.setattr(kernelapi.FakeCUDAModule, name, getattr(_Warps, name), raising=False)
    monkeypatch.setattr(kernelapi.FakeCUDAModule, "LANES", _Warps.LANES, raising=False)


def test_warp_shuffle_reductions_match_the_interpreter(simulated_warps, tmp_path):
    """The row kernels (softmax, layer norm, cross-entropy and its gradient, sums over the batch)
    printed as the GPU gets them, reductions by warp shuffles then shared memory across warps:
    blocks of 8 threads in warps of 4 take both stages."""
    from gradfuse.codegen.cuda import CUDABackend

    unfused, _ = scenarios_graph()
    g, _ = fuse(unfused, batch=256, target=TARGET)
    prog = Program.compile(g, str(tmp_path), backend=CUDABackend("cudasim", block=8, warp=_Warps.LANES))
    assert "cuda.shfl_down_sync(0xf, " in prog.source and "red_f32" not in prog.source
    ref, got, _ = run_both(g, prog, scenario_feeds(g, 3))
    for v, want, out in zip(g.outputs, ref.outputs, got, strict=True):
        assert_matches(np.asarray(out), want, v.name.split(".")[-1], f"%{v.name} with warp shuffles")


def test_device_arrays_are_checked_before_any_launch(tmp_path):
    """A device array of the wrong shape or dtype is refused in words, as a host array is; one of
    the right type runs where it is, and a host array is moved across and back."""
    from numba import cuda

    from gradfuse.errors import InputError
    from gradfuse.ir.graph import ArgKind, GraphBuilder
    from gradfuse.ir.types import DType, TensorType
    from gradfuse.runtime.device import TRANSFERS

    b = GraphBuilder("scale")
    xv = b.arg("x", TensorType(DType.f32, ("N", 3)), exact=True)
    wv = b.arg("w", TensorType(DType.f32, (3,)), ArgKind.param, exact=True)
    g = b.finish(b.emit("mul", [xv, wv]))
    prog = Program.compile(g, str(tmp_path), target=TARGET)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    w = np.array([1, 2, 3], np.float32)
    before = TRANSFERS.copy()
    (y,) = prog.run({"x": x, "w": cuda.to_device(w)})
    np.testing.assert_array_equal(y, x * w)
    assert TRANSFERS - before == {"to_device": 1, "to_host": 1}  # x across, y back; w stayed
    for bad, says in [(cuda.to_device(np.ones(4, np.float32)), r"%w \(param\) expects f32\[3\], got a device array"),
                      (cuda.to_device(np.ones(3, np.float64)), r"expects f32\[3\], got a device array float64")]:
        with pytest.raises(InputError, match=says):
            prog.run({"x": x, "w": bad})


def test_the_command_line_trains_and_runs_on_cudasim(example_model, tmp_path, capsys, cpu_cache):
    """`gradfuse train --target cudasim -o DIR` on a tiny data file, then `gradfuse run DIR`: the
    artifact's predictions are the CPU backend's for the same weights."""
    from test_cli import MLP

    import gradfuse as gf
    from gradfuse.cli import main

    rng = np.random.default_rng(1)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=rng.standard_normal((4, 64)).astype(np.float32), y_train=rng.integers(0, 10, 4),
             x_test=rng.standard_normal((2, 64)).astype(np.float32), y_test=rng.integers(0, 10, 2))
    art, x, y = tmp_path / "art", tmp_path / "x.npy", tmp_path / "y.npy"
    assert main(["train", MLP, "--target", TARGET, "--data", str(data), "--epochs", "1", "--batch-size", "4",
                 "-o", str(art)]) == 0
    assert "wrote the trained model to" in capsys.readouterr().out
    np.save(x, rng.standard_normal((2, 64)).astype(np.float32))
    assert main(["run", str(art), "--input", str(x), "--output", str(y)]) == 0
    trained = gf.load(str(art))
    assert trained.predict_program.backend.name == TARGET
    cpu = gf.compile(example_model("digits_mlp"), gf.SGD(momentum=0.9), cache_dir=cpu_cache)
    cpu.load_state_dict(trained.state_dict())
    np.testing.assert_allclose(np.load(y), cpu.predict(np.load(x)), rtol=1e-5, atol=1e-6)


def test_the_gpu_benchmarks_run_on_tiny_shapes():
    """`bench --target cuda`'s code on the simulator, shapes a few elements wide (its timings
    mean nothing here; on a GPU the same functions print the figures)."""
    from gradfuse import bench_cuda

    rows = bench_cuda.mlp_train(4, (8, 6, 3), min_s=0.01, compile_torch=False, target=TARGET)
    rows += bench_cuda.mlp_inference(1, (8, 6, 3), min_s=0.01, target=TARGET)
    rows += bench_cuda.gelu_layernorm(4, 8, min_s=0.01, target=TARGET, copy_bytes=64)
    assert [r.implementation for r in rows] == ["gradfuse"] * 3 + ["HBM bandwidth (device copy)"]
    assert all(r.seconds > 0 for r in rows) and "TFLOP/s" in rows[0].note and "GB/s measured" in rows[-1].note
