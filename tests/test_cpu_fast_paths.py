"""Two things the CPU printer does for speed, each checked by the code it prints and by results:

- a kernel whose output takes over the storage of a buffer it reads loads that buffer by the
  output's name, so LLVM sees one array (two names for it fail LLVM's run-time overlap check and
  leave the loop scalar: the transformer block's GEMM + gelu_grad kernel took 33 ms so, 9 ms not);
- a large kernel without a GEMM gets a parallel twin, which the step runs from PARALLEL_ELEMENTS.
"""

from __future__ import annotations

import numpy as np
import pytest
from strategies import run_both

import gradfuse as gf
from gradfuse import nn
from gradfuse.bench import GeluLayerNorm, numpy_gelu_layernorm
from gradfuse.codegen.cpu import PARALLEL_ELEMENTS, KernelPrinter, Writer, arr
from gradfuse.ir.graph import ArgKind


class GeluMLP(nn.Module):
    def __init__(self):
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.down(gf.functional.gelu(self.up(x)))


@pytest.fixture(scope="module")
def gelu_mlp(kernel_cache):
    model = gf.Model(GeluMLP(), inputs={"x": "f32[N,8]"}, targets={"y": "f32[N,8]"}, loss=gf.functional.mse_loss)
    return model, gf.compile(model, gf.SGD(), cache_dir=kernel_cache)


def _training_feeds(model, prog, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    values = model.initial_values()
    feeds = {"lr": np.asarray(0.1, np.float32)}
    for kind, v in prog.graph.args:
        if kind is ArgKind.input and v.name != "lr":
            feeds[v.name] = rng.standard_normal(v.type.concrete({"N": n})).astype(np.float32)
        elif kind is not ArgKind.input:
            feeds[v.name] = values[v.name].copy()
    return feeds


def test_a_kernel_overwriting_what_it_reads_loads_it_by_the_written_name(gelu_mlp):
    model, compiled = gelu_mlp
    prog = compiled.train_program
    shared = [(k, x, y) for k in prog.kernels.kernels for x, y in k.same_storage.items()]
    assert any(n.op == "gelu_grad" for k, _, _ in shared for n in k.nodes), \
        [(k.name, x.name, y.name) for k, x, y in shared]
    for k, x, y in shared:
        w = Writer()
        KernelPrinter(k, w, prog.kernels, prog.in_place).print()
        code = "\n".join(w.lines)
        assert f"= {arr(x)}[" not in code, code
        if any(n.op == "gelu_grad" for n in k.nodes):
            assert f"= {arr(y)}[" in code, code
    for n in (1, 5, 300):  # and at every batch size the plan shares that storage, with the interpreter's results
        ref, got, after = run_both(prog.graph, prog, _training_feeds(model, prog, n))
        for want, out in zip(ref.outputs, got, strict=True):
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        for name, want in ref.state.items():
            np.testing.assert_allclose(after[name], want, rtol=1e-5, atol=1e-6)


def test_the_runtime_refuses_a_plan_that_does_not_share_what_the_code_assumes(gelu_mlp):
    model, compiled = gelu_mlp
    prog = compiled.train_program
    k = next(k for k in prog.kernels.kernels if k.same_storage and any(n.op == "gelu_grad" for n in k.nodes))
    x, y = next(iter(k.same_storage.items()))
    other = next(v for v in prog.kernels.buffers if v not in (x, y) and v.type == y.type)  # in storage of its own
    saved = dict(k.same_storage)
    try:
        k.same_storage = {x: other}
        prog._buffers.clear()
        with pytest.raises(AssertionError, match="does not share the storage"):
            prog.buffers({"N": 7})
    finally:
        k.same_storage = saved
        prog._buffers.clear()


def test_a_large_kernel_without_a_gemm_runs_its_parallel_twin(kernel_cache):
    dim = 256
    compiled = gf.compile(gf.Model(GeluLayerNorm(dim), inputs={"x": f"f32[N,{dim}]"}, name="twin_gelu_layernorm"),
                          cache_dir=kernel_cache)
    prog = compiled.predict_program
    twins = [getattr(prog.module, name) for name in dir(prog.module) if name.endswith("_parallel")]
    assert len(twins) == 1 and "prange(" in prog.source
    gamma, beta = compiled.weights["norm.weight"], compiled.weights["norm.bias"]
    prog.one_dispatch = False  # the Python step: a dispatcher per kernel, whose compiled signatures show
    rng = np.random.default_rng(0)
    small = rng.standard_normal((3, dim), dtype=np.float32)
    np.testing.assert_allclose(compiled.predict(small), numpy_gelu_layernorm(small, gamma, beta), rtol=1e-4, atol=1e-5)
    assert not twins[0].signatures, "the twin ran below PARALLEL_ELEMENTS"
    large = rng.standard_normal((PARALLEL_ELEMENTS // dim, dim), dtype=np.float32)
    np.testing.assert_allclose(compiled.predict(large), numpy_gelu_layernorm(large, gamma, beta), rtol=1e-4, atol=1e-5)
    assert twins[0].signatures, "the twin did not run at PARALLEL_ELEMENTS"
