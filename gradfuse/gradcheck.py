"""Gradient checking and gradient health, for users.

``gradcheck`` runs the generated backward graph in float64 with the reference interpreter and
compares each parameter's gradient with finite differences of the loss along random unit
directions v: ⟨∇L, v⟩ ≈ (L(p-2hv) - 8L(p-hv) + 8L(p+hv) - L(p+2hv)) / 12h, a central stencil
whose error is O(h⁴), so a small h (few ReLU kinks crossed) still leaves rounding noise far
below the 1e-6 we check for. ``gradient_health`` reports per-layer
gradient norms for a batch and flags vanishing or exploding gradients.
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


@dataclass(frozen=True)
class ParamCheck:
    name: str
    shape: tuple[int, ...]
    worst_rel_error: float
    grad_norm: float
    param_norm: float
    zero: bool  # the loss does not move along this parameter (e.g. a bias just before BatchNorm)


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
    values = model.initial_values()
    out = {}
    for kind, v in graph.args:
        if kind is ArgKind.input:
            continue
        out[v.name] = values[v.name].astype(v.type.dtype.np) if v.name in values else \
            np.zeros(v.type.concrete({}), v.type.dtype.np)  # e.g. the dropout step counter
    return out


def gradcheck(model: Model, batch: int = 8, directions: int = 3, h: float = 1e-5,
              seed: int = 0) -> list[ParamCheck]:
    """Check every parameter's gradient from the backward graph in float64."""
    forward = with_float(model.trace(train=True, with_loss=True), DType.f64)
    joint = differentiate(forward)
    feeds = {**example_feeds(model, forward, batch, seed), **_weights(model, forward)}
    feeds = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    result = interpret(joint.graph, feeds)
    grads = dict(zip(joint.grads, result.outputs[len(forward.outputs):], strict=True))

    def loss_at(name: str, value: np.ndarray) -> float:
        return float(interpret(forward, {**feeds, name: value}).outputs[0])

    loss = float(result.outputs[0])
    noise = 1e-15 * max(abs(loss), 1.0) / h  # the stencil's rounding error on the loss
    rng = np.random.default_rng(seed + 1)
    report = []
    for name, grad in grads.items():
        p = feeds[name]
        worst, zero = 0.0, True
        for _ in range(directions):
            v = rng.normal(size=p.shape)
            v /= np.linalg.norm(v) or 1.0
            f = {k: loss_at(name, p + k * h * v) for k in (-2, -1, 1, 2)}
            numeric = (f[-2] - 8 * f[-1] + 8 * f[1] - f[2]) / (12 * h)
            analytic = float(np.sum(grad * v))
            if max(abs(numeric), abs(analytic)) < 10 * noise:
                continue  # both zero to within rounding: nothing to compare
            zero = False
            worst = max(worst, abs(numeric - analytic) / max(abs(numeric), abs(analytic)))
        report.append(ParamCheck(name, p.shape, worst, float(np.linalg.norm(grad)), float(np.linalg.norm(p)), zero))
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
