"""Kernels identical up to buffer names compile once: later layers call the first layer's
function; the compile says how many it compiled and reused, with a progress bar on a terminal."""

from __future__ import annotations

import io

import numpy as np
from dsl_helpers import randn

import gradfuse as gf
from gradfuse import functional as F
from gradfuse import nn
from gradfuse.codegen.cpu import canonical_kernel, kernel_counts
from gradfuse.runtime.program import CompileProgress


class Tower(nn.Module):
    def __init__(self, depth: int = 4, width: int = 8):
        self.blocks = nn.Sequential(*[nn.Residual(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width),
                                                                nn.GELU())) for _ in range(depth)])
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


def test_identical_layers_share_compiled_kernels_and_compute_the_same():
    model = gf.Model(Tower(), inputs={"x": "f32[N,8]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy)
    compiled = gf.compile(model, gf.SGD())
    for prog in (compiled.predict_program, compiled.train_program):
        made, reused = prog.kernel_counts
        assert reused >= 3 and (made, reused) == kernel_counts(prog.source)
        assert "the code of" in prog.source
    assert "compiled" in compiled.kernel_report() and "reused" in compiled.kernel_report()
    x = randn((5, 8))
    want = gf.interpret(model.trace(), {"x": x, **model.initial_values()}).outputs[0]
    np.testing.assert_allclose(compiled.predict(x), want, rtol=1e-5, atol=1e-5)
    losses = [compiled.train_step(x, np.arange(5) % 3, lr=0.1) for _ in range(20)]
    assert losses[-1] < losses[0]


def test_canonical_code_ignores_names_but_not_arithmetic():
    def code(params, x, y, sign=""):
        lines = ["    for i in range(N):", f"        v_t = {x}[i]", f"        {y}[i] = {sign}v_t"]
        return canonical_kernel(params, lines)

    a = code(["b_x", "b_y", "N"], "b_x", "b_y")
    assert a == code(["b_p", "b_q", "N"], "b_p", "b_q")
    assert a != code(["b_p", "b_q", "N"], "b_p", "b_q", "-")
    assert a != code(["b_q", "b_p", "N"], "b_p", "b_q")  # the arguments in another order


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_shows_on_a_terminal_only():
    tty, log = _Terminal(), io.StringIO()
    for stream in (tty, log):
        bar = CompileProgress(4, stream=stream, after=0.0)
        for _ in range(4):
            bar()
        bar.close()
    assert "4/4 kernels" in tty.getvalue() and "[" in tty.getvalue()
    assert log.getvalue() == ""
    quick = _Terminal()
    bar = CompileProgress(2, stream=quick, after=60.0)  # done before a second has passed: no bar
    bar()
    bar()
    bar.close()
    assert quick.getvalue() == ""


class Widths(nn.Module):
    """Layers of three widths, each with its dropout (its own stream): kernels that differ only in
    integers (widths, stream numbers) share one function taking them as arguments."""

    def __init__(self):
        self.layers = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Dropout(0.25), nn.Linear(12, 16), nn.GELU(),
                                    nn.Dropout(0.25), nn.Linear(16, 20), nn.GELU(), nn.Dropout(0.25))
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        return self.head(self.layers(x))


def test_kernels_differing_in_integers_share_code_across_programs_and_compute_the_same(tmp_path):
    model = gf.Model(Widths(), inputs={"x": "f32[N,8]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy)
    compiled = gf.compile(model, gf.SGD(momentum=0.9), cache_dir=str(tmp_path))
    train = compiled.train_program
    assert "LITERALS = {'k" in train.source  # the integers each kernel passes to shared code
    assert "= _module0.k" in train.source  # the training step calls kernels of the predict program's module
    x, y = randn((6, 8)), np.arange(6) % 3
    want = gf.interpret(model.trace(), {"x": x, **model.initial_values()}).outputs[0]
    np.testing.assert_allclose(compiled.predict(x), want, rtol=1e-5, atol=1e-5)
    feeds = {**{k: v.copy() for k, v in compiled.weights.items()}, "x": x, "y": y, "lr": np.float32(0.1)}
    reference = gf.interpret(train.graph, feeds).outputs
    loss = compiled.train_step(x, y, lr=0.1)
    np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
    checked = gf.compile(model, gf.SGD(momentum=0.9), cache_dir=str(tmp_path))
    checked.check = True  # kernel by kernel (run_checked): the runtime passes each kernel's integers
    assert abs(checked.train_step(x, y, lr=0.1) - loss) < 1e-5
