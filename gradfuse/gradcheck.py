"""Gradient checking and gradient health, for users.

``gradcheck`` runs the generated backward graph in float64 with the reference interpreter and
compares, for each parameter p and a few random unit directions v, the backward's directional
derivative a = ⟨∇L, v⟩ with the central finite difference

    D(h) = (L(p-2hv) - 8L(p-hv) + 8L(p+hv) - L(p+2hv)) / 12h.

D(h) has two errors: truncation, O(h⁴), and rounding, about ε·|L|/h (every loss value carries a
rounding error of ~ε|L| and the stencil divides it by h). The default h = 1e-3 ≈ ε^(1/5) balances
the two for losses and parameters of order one; at h = 1e-5 the rounding term alone can exceed 1e-3
of a deep network's small early-layer derivatives. Rather than assume the error, we measure it
with a second step: D(2h) has 16x the truncation error and its own rounding, so |D(h) - D(2h)|
covers D(h)'s truncation 15x over and is one draw of its rounding noise. One draw can land near
zero, so the rounding floor ε·max(|L|, 1)/h is kept under it:

    noise = max(|D(h) - D(2h)|, ε·max(|L|, 1)/h).

A direction passes when |D(h) - a| <= tol·max(|D|, |a|) ("ok") or <= SAFETY·noise ("ok within FD
noise"). SAFETY = 4: over 3,000 directions of correct backwards (a 10-layer sigmoid MLP and the
examples, h from 1e-5 to 1e-3) |D(h) - a| stayed below 1.7x noise, so 4 leaves room for noisier
losses, while the allowance stays far below a real bug's 1% wherever the check claims anything
(a 1% error in the sigmoid MLP's first layer fails at 4x noise = 2e-5 at h = 1e-3). When SAFETY·noise
exceeds ``max_noise`` (1e-3) of the derivative itself, the finite differences cannot resolve even a
0.1% error: that direction is "inconclusive" and says nothing (e.g. one nearly orthogonal to the
gradient, whose derivative is tiny). A parameter takes the worst verdict of its other directions;
when every direction is inconclusive, so is the parameter, which is not a pass.

``gradient_health`` reports per-layer gradient norms for a batch and flags vanishing or exploding
gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradfuse.ir.graph import ArgKind, Graph
from gradfuse.ir.interpreter import interpret
from gradfuse.ir.types import DType
from gradfuse.model import Model
from gradfuse.passes.autodiff import GRAD_PREFIX, differentiate
from gradfuse.passes.precision import with_float

DEFAULT_EPS = 1e-3  # the finite-difference step h: ≈ ε^(1/5), see the module docstring
DEFAULT_TOL = 1e-6  # relative agreement that passes outright
SAFETY = 4.0  # a direction within SAFETY x the measured finite-difference noise passes
MAX_NOISE = 1e-3  # relative noise above which the finite differences prove nothing

# verdicts, best first; a parameter's verdict is its worst direction's
OK, OK_NOISE, ZERO, INCONCLUSIVE, FAILED = "ok", "ok within FD noise", "zero grad", "inconclusive", "FAILED"
PASSING = (OK, OK_NOISE, ZERO)
_RANK = {OK: 0, OK_NOISE: 1, INCONCLUSIVE: 2, FAILED: 3}


@dataclass(frozen=True)
class ParamCheck:
    name: str
    shape: tuple[int, ...]
    worst_rel_error: float  # max of |D - a| / max(|D|, |a|) over the deciding directions
    grad_norm: float
    param_norm: float
    zero: bool  # the loss does not move along this parameter (e.g. a bias just before BatchNorm)
    fd_noise: float = 0.0  # max of the measured finite-difference noise / max(|D|, |a|), same directions
    verdict: str = OK  # ok, ok within FD noise, zero grad, inconclusive or FAILED
    unresolved: int = 0  # directions set aside as inconclusive while others decided

    @property
    def passed(self) -> bool:
        return self.verdict in PASSING


@dataclass(frozen=True)
class Direction:
    """One direction's comparison: the backward's ⟨∇L, v⟩, D(h), and D(h)'s measured error."""

    analytic: float
    numeric: float
    noise: float  # absolute: max(|D(h) - D(2h)|, ε·max(|L|, 1)/h)

    @property
    def scale(self) -> float:
        return max(abs(self.numeric), abs(self.analytic))

    @property
    def error(self) -> float:
        return abs(self.numeric - self.analytic)

    @property
    def zero(self) -> bool:
        """Both derivatives are indistinguishable from zero at this noise: nothing to compare."""
        return self.scale < SAFETY * self.noise

    def verdict(self, tol: float, max_noise: float) -> str:
        if self.error <= tol * self.scale:
            return OK
        if self.error <= SAFETY * self.noise:
            return OK_NOISE if SAFETY * self.noise <= max_noise * self.scale else INCONCLUSIVE
        return FAILED


def stencil(f: dict[int, float], h: float, s: int = 1) -> float:
    """The O(h⁴) central difference at step s·h from loss values f[k] = L(p + k·h·v)."""
    return (f[-2 * s] - 8 * f[-s] + 8 * f[s] - f[2 * s]) / (12 * h * s)


def directional(loss_along, analytic: float, h: float, loss: float) -> Direction:
    """Compare ``analytic`` with D(h); ``loss_along(t)`` is L(p + t·v)."""
    f = {k: loss_along(k * h) for k in (-4, -2, -1, 1, 2, 4)}
    numeric = stencil(f, h)
    floor = float(np.finfo(np.float64).eps) * max(abs(loss), 1.0) / h
    return Direction(analytic, numeric, max(abs(numeric - stencil(f, h, 2)), floor))


def summarize(name: str, p: np.ndarray, grad: np.ndarray, dirs: list[Direction], tol: float,
              max_noise: float) -> ParamCheck:
    """One parameter's row. Directions too noisy to tell (inconclusive) neither confirm nor refute:
    the others decide, the worst of them wins; the parameter is inconclusive when all are."""
    compared = [(d, d.verdict(tol, max_noise)) for d in dirs if not d.zero]
    resolved = [(d, v) for d, v in compared if v != INCONCLUSIVE]
    deciding = resolved or compared
    worst = max((d.error / d.scale for d, _ in deciding), default=0.0)
    noise = max((d.noise / d.scale for d, _ in deciding), default=0.0)
    verdict = max((v for _, v in deciding), key=_RANK.get, default=ZERO)
    unresolved = len(compared) - len(resolved) if resolved else 0
    return ParamCheck(name, p.shape, worst, float(np.linalg.norm(grad)), float(np.linalg.norm(p)),
                      not compared, noise, verdict, unresolved)


def example_feeds(model: Model, graph: Graph, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch for ``graph``: the first rows of the model's training data where it has data,
    else random inputs (integer inputs in [0, 2), valid labels and ids for any model)."""
    rng = np.random.default_rng(seed)
    data = model.data() if model.data is not None else {}
    feeds: dict[str, np.ndarray] = {}
    sources = {**{n: "x_train" for n in list(model.inputs)[:1]}, **{n: "y_train" for n in list(model.targets)[:1]}}
    for v in graph.inputs:
        key = sources.get(v.name)
        if key in data:
            a = data[key][:batch]
        elif v.type.dtype.is_float:
            a = rng.normal(size=v.type.concrete({"N": batch}))
        else:
            a = rng.integers(0, 2, size=v.type.concrete({"N": batch}))
        feeds[v.name] = np.asarray(a).astype(v.type.dtype.np)
    return feeds


def _weights(model: Model, graph: Graph) -> dict[str, np.ndarray]:
    values = model.initial_values("f64")  # loaded float64 weights stay exact
    out = {}
    for kind, v in graph.args:
        if kind is ArgKind.input:
            continue
        out[v.name] = values[v.name].astype(v.type.dtype.np) if v.name in values else \
            np.zeros(v.type.concrete({}), v.type.dtype.np)  # e.g. the dropout step counter
    return out


def gradcheck(model: Model, batch: int = 8, directions: int = 3, h: float = DEFAULT_EPS,
              seed: int = 0, tol: float = DEFAULT_TOL, max_noise: float = MAX_NOISE) -> list[ParamCheck]:
    """Check every parameter's gradient from the backward graph in float64 (module docstring)."""
    if not h > 0:
        raise ValueError(f"the finite-difference step must be positive, not {h}")
    forward = with_float(model.trace(train=True, with_loss=True), DType.f64)
    joint = differentiate(forward)
    feeds = {**example_feeds(model, forward, batch, seed), **_weights(model, forward)}
    feeds = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    result = interpret(joint.graph, feeds)
    grads = dict(zip(joint.grads, result.outputs[len(forward.outputs):], strict=True))
    loss = float(result.outputs[0])
    rng = np.random.default_rng(seed + 1)
    report = []
    for name, grad in grads.items():
        p = feeds[name]
        dirs = []
        for _ in range(directions):
            v = rng.normal(size=p.shape)
            v /= np.linalg.norm(v) or 1.0

            def loss_along(t: float, name=name, p=p, v=v) -> float:
                return float(interpret(forward, {**feeds, name: p + t * v}).outputs[0])

            dirs.append(directional(loss_along, float(np.sum(grad * v)), h, loss))
        report.append(summarize(name, p, grad, dirs, tol, max_noise))
    return report


@dataclass(frozen=True)
class LayerHealth:
    layer: str  # the value whose gradient is measured (a layer's output), in forward order
    shape: tuple[int, ...]
    grad_norm: float  # ‖∂L/∂output‖ over the batch
    flag: str  # "", "vanishing?" or "exploding?"


def gradient_health(model: Model, batch: int = 64, seed: int = 0, vanish: float = 1e-4,
                    explode: float = 1e3) -> list[LayerHealth]:
    """‖∂L/∂a‖ for each layer output ``a`` (course notes §05): a layer whose gradient is below
    ``vanish`` times the loss gradient at the last layer is flagged vanishing; above
    ``explode`` times, exploding."""
    forward = model.trace(train=True, with_loss=True)
    joint = differentiate(forward)
    feeds = {**example_feeds(model, forward, batch, seed), **_weights(model, forward)}
    env = interpret(joint.graph, feeds).env
    produced = [n.outputs[0] for n in forward.nodes if n.scope and n.outputs[0].name == n.scope]
    rows = [(v.name, env[f"{GRAD_PREFIX}{v.name}"]) for v in produced if f"{GRAD_PREFIX}{v.name}" in env]
    if not rows:
        return []
    reference = float(np.linalg.norm(rows[-1][1])) or 1.0
    out = []
    for name, g in rows:
        norm = float(np.linalg.norm(g))
        flag = "vanishing?" if norm < vanish * reference else "exploding?" if norm > explode * reference else ""
        out.append(LayerHealth(name, g.shape, norm, flag))
    return out
