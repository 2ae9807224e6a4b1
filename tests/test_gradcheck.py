"""gradcheck tells finite-difference noise from a bug: a deep sigmoid MLP, whose early layers'
derivatives are tiny, passes (it failed at 9.3e-04 with the old fixed-tolerance check at h = 1e-5);
a 1% error in one VJP still fails, there too; --eps and --tol work; the examples pass."""

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest

from gradfuse import gradcheck as gc
from gradfuse.cli import build_parser, main
from gradfuse.ir.registry import get_op
from gradfuse.loader import load_model

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

DEEP_SIGMOID = '''"""Ten Linear+Sigmoid layers: the first layers' gradients are ~1e-5 of the last ones'."""
import gradfuse as gf
from gradfuse import nn
from gradfuse import functional as F

layers = []
for _ in range(10):
    layers += [nn.Linear(16, 16), nn.Sigmoid()]

model = gf.Model(nn.Sequential(*layers, nn.Linear(16, 4)), inputs={"x": "f32[N,16]"},
                 targets={"y": "i64[N]"}, loss=F.cross_entropy)
'''


@pytest.fixture(scope="module")
def deep_sigmoid_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "deep_sigmoid.py"
    path.write_text(DEEP_SIGMOID, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def deep_sigmoid(deep_sigmoid_file):
    return load_model(deep_sigmoid_file)


@contextlib.contextmanager
def broken_vjp(op_name: str, scale: float = 1.01, scope: str | None = None):
    """Scale the gradient a VJP rule returns by ``scale`` (a 1% bug), for the nodes of ``scope``
    only when given. OpDef is frozen, hence object.__setattr__, as in test_training_ir.py."""
    op = get_op(op_name)
    original = op.vjp

    def rule(ctx, g):
        grads = original(ctx, g)
        if scope is not None and ctx.node.scope != scope:
            return grads
        return [None if d is None else ctx.emit("mul", d, ctx.const(scale, d), rule="a bug") for d in grads]

    object.__setattr__(op, "vjp", rule)
    try:
        yield
    finally:
        object.__setattr__(op, "vjp", original)


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    rc = main(["gradcheck", *argv, "--health-batch", "8"])
    return rc, capsys.readouterr().out.rstrip("\n").splitlines()


def by_name(report) -> dict[str, gc.ParamCheck]:
    return {r.name: r for r in report}


# ---- the verdict of one direction, on numbers -------------------------------------------------
@pytest.mark.parametrize("numeric, noise, verdict", [
    (1.0 + 1e-8, 1e-12, gc.OK),  # within --tol
    (1.0 + 1e-5, 1e-5, gc.OK_NOISE),  # off by 1e-5, FD error measured at 1e-5
    (1.0 + 1e-5, 1e-3, gc.INCONCLUSIVE),  # agrees, but 4x the noise is 4e-3 of the derivative
    (1.0 + 5e-5, 1e-5, gc.FAILED),  # beyond 4x the noise
    (1.02, 1e-3, gc.FAILED),  # a 2% error is not noise even where the FD resolve little
])
def test_direction_verdict(numeric, noise, verdict):
    assert gc.Direction(1.0, numeric, noise).verdict(gc.DEFAULT_TOL, gc.MAX_NOISE) == verdict


def test_stencil_is_exact_for_quartics_and_d2h_measures_the_truncation():
    def f(t):
        return 3 * t**4 - t**3 + 2 * t

    h = 0.1
    values = {k: f(k * h) for k in (-4, -2, -1, 1, 2, 4)}
    assert gc.stencil(values, h) == pytest.approx(2.0, rel=1e-12)
    assert gc.stencil(values, h, 2) == pytest.approx(2.0, rel=1e-12)
    # a quintic's h⁴ truncation: D(2h) has 16x D(h)'s, so |D(h) - D(2h)| = 15x D(h)'s error
    d = gc.directional(lambda t: t**5, 0.0, h, loss=1.0)
    assert d.numeric == pytest.approx(-4 * h**4, rel=1e-9)
    assert d.noise == pytest.approx(15 * 4 * h**4, rel=1e-9)


def test_an_inconclusive_direction_is_set_aside_when_others_decide():
    sure, vague = gc.Direction(1.0, 1.0, 1e-9), gc.Direction(1e-4, 1.1e-4, 1e-5)
    p = np.ones(3)
    row = gc.summarize("w", p, p, [sure, vague], gc.DEFAULT_TOL, gc.MAX_NOISE)
    assert (row.verdict, row.unresolved, row.passed) == (gc.OK, 1, True)
    row = gc.summarize("w", p, p, [vague], gc.DEFAULT_TOL, gc.MAX_NOISE)
    assert (row.verdict, row.passed) == (gc.INCONCLUSIVE, False)


# ---- the deep sigmoid MLP ---------------------------------------------------------------------
def test_deep_sigmoid_passes_through_the_cli(deep_sigmoid_file, capsys):
    rc, lines = run_cli(capsys, deep_sigmoid_file)
    assert rc == 0, "\n".join(lines)
    assert lines[-1].startswith("OK: every parameter's gradient matches finite differences")


def test_deep_sigmoid_at_the_old_step_is_noise_not_a_bug(deep_sigmoid):
    """At h = 1e-5 the early layers disagree by far more than 1e-6 (the old check's 9.3e-04
    FAILED); the measured noise explains it, and no parameter fails."""
    old = gc.gradcheck(deep_sigmoid, h=1e-5, tol=float("inf"))  # every direction, none set aside
    assert max(r.worst_rel_error for r in old) > 1e-4
    report = gc.gradcheck(deep_sigmoid, h=1e-5)
    assert all(r.passed for r in report), [(r.name, r.verdict) for r in report if not r.passed]
    noisy = [r for r in report if r.verdict == gc.OK_NOISE]
    assert noisy and max(r.worst_rel_error for r in noisy) > 10 * gc.DEFAULT_TOL
    assert all(r.worst_rel_error <= gc.SAFETY * r.fd_noise for r in noisy)
    # and the default step makes the finite differences ~100x better there
    default = by_name(gc.gradcheck(deep_sigmoid))
    assert all(r.passed for r in default.values())
    assert max(r.fd_noise for r in default.values()) < max(r.fd_noise for r in report) / 10


@pytest.mark.parametrize("h", [gc.DEFAULT_EPS, 1e-5])
def test_a_one_percent_bug_in_the_first_layer_still_fails(deep_sigmoid, h):
    """Only the first sigmoid's VJP (scope "1") is off by 1%: exactly the parameters with the
    noisiest finite differences are wrong, and the noise allowance does not swallow it."""
    with broken_vjp("sigmoid", 1.01, scope="1"):
        report = by_name(gc.gradcheck(deep_sigmoid, h=h))
    for name in ("0.weight", "0.bias"):
        r = report[name]
        assert r.verdict == gc.FAILED, (name, r)
        assert r.worst_rel_error > 0.009 and gc.SAFETY * r.fd_noise < 0.005
    assert all(r.passed for name, r in report.items() if not name.startswith("0."))


def test_a_one_percent_bug_fails_the_cli(deep_sigmoid_file, capsys):
    with broken_vjp("sigmoid", 1.01):
        rc, lines = run_cli(capsys, deep_sigmoid_file)
        rc_tol, lines_tol = run_cli(capsys, deep_sigmoid_file, "--tol", "0.2")
    assert rc == 1
    assert lines[-1].startswith("FAILED: the backward disagrees") and "0.weight" in lines[-1]
    assert rc_tol == 0, lines_tol[-1]  # --tol 0.2 accepts 10 layers x 1%


def test_dropping_the_relu_mask_fails(example_model):
    with contextlib.ExitStack() as stack:
        relu = get_op("relu")
        original = relu.vjp
        object.__setattr__(relu, "vjp", lambda ctx, g: [g])
        stack.callback(object.__setattr__, relu, "vjp", original)
        report = gc.gradcheck(example_model("digits_mlp"), batch=8, directions=1)
    assert by_name(report)["fc1.weight"].verdict == gc.FAILED


# ---- flags ------------------------------------------------------------------------------------
def test_flags_defaults_and_alias():
    parse = build_parser().parse_args
    args = parse(["gradcheck", "m.py"])
    assert (args.eps, args.tol) == (gc.DEFAULT_EPS, gc.DEFAULT_TOL)
    assert parse(["gradcheck", "m.py", "--tolerance", "1e-4"]).tol == 1e-4
    assert parse(["gradcheck", "m.py", "--tol", "1e-4", "--eps", "1e-4"]).eps == 1e-4


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["gradcheck", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--eps EPS" in text and "default: 0.001" in text
    assert "--tol TOL, --tolerance TOL" in text and "default: 1e-06" in text


def test_a_tiny_eps_is_inconclusive_not_a_pass(deep_sigmoid_file, capsys):
    rc, lines = run_cli(capsys, deep_sigmoid_file, "--eps", "1e-8")
    assert rc == 1
    assert any(line.startswith("inconclusive: the finite differences are too noisy") for line in lines)
    assert lines[-1].startswith("INCONCLUSIVE:") and "0.weight" in lines[-1]
    assert "(step 1e-08)" in lines[0]


def test_a_bad_eps_is_a_user_error(deep_sigmoid_file, capsys):
    assert main(["gradcheck", deep_sigmoid_file, "--eps", "0"]) == 1
    assert "--eps > 0" in capsys.readouterr().err


def test_the_command_exits_0_in_a_subprocess(deep_sigmoid_file):
    done = subprocess.run([sys.executable, "-m", "gradfuse.cli", "gradcheck", deep_sigmoid_file,
                           "--directions", "2", "--health-batch", "8", "--eps", "1e-3", "--tolerance", "1e-6"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().splitlines()[-1].startswith("OK:")


# ---- the examples -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, zero", [
    ("digits_mlp", []),
    ("residual_mlp", ["blocks.0.block.fc1.bias", "blocks.1.block.fc1.bias"]),  # biases before BatchNorm
    ("digits_attention", ["attn.k.bias"]),  # softmax ignores a shift shared by every key
])
def test_examples_pass(name, zero, capsys):
    rc, lines = run_cli(capsys, os.path.join(EXAMPLES, f"{name}.py"), "--batch", "4", "--directions", "2")
    assert rc == 0, "\n".join(lines)
    assert lines[-1].startswith("OK:")
    rows = {line.split()[0]: line for line in lines if line.startswith("  ") and line.rstrip().endswith("zero grad")}
    assert sorted(rows) == zero
