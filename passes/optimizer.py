"""Optimizer steps as IR: append parameter updates to a joint forward+backward graph, so one
graph is a whole training step (forward, backward, update) and its state (momentum, Adam
moments, step count) is graph state like BatchNorm's running statistics.

The learning rate is a graph input (``%lr: f32[]``) so schedules need no recompilation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import ArgKind, Graph, GraphBuilder, Value
from gradfuse.ir.types import DType, TensorType

from .autodiff import Gradients, gradients_of
from .manager import Pass, PassResult, register_pass


@dataclass(frozen=True)
class SGD:
    """PyTorch's SGD: g += wd·p; v = μ·v + g; p -= lr·v (v = g when μ = 0)."""

    momentum: float = 0.0
    weight_decay: float = 0.0

    def describe(self) -> str:
        return f"sgd(momentum={self.momentum}, weight_decay={self.weight_decay})"


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba) with bias correction (1 - β^t computed in float64); ``weight_decay`` adds
    wd·p to g (L2, as PyTorch's Adam)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def describe(self) -> str:
        return f"adam(beta1={self.beta1}, beta2={self.beta2}, eps={self.eps}, weight_decay={self.weight_decay})"


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


@dataclass(frozen=True)
class TrainingStep:
    graph: Graph  # args: inputs, targets, %lr, params, state; outputs: loss, prediction
    new_state: dict[str, np.ndarray]  # initial values of the state the optimizer added (zeros)
    left_alone: tuple[str, ...] = ()  # params the loss does not depend on: no update and no state


class _Updater:
    def __init__(self, b: GraphBuilder, opt, note: str):
        self.b, self.opt, self.note = b, opt, note

    def emit(self, op: str, *inputs: Value, hint: str, what: str, **attrs) -> Value:
        return self.b.emit1(op, *inputs, attrs=attrs, hint=hint, note=f"{self.note}: {what}")

    def c(self, value: float, like: Value) -> Value:
        return self.b.scalar(value, like.type.dtype)

    def bias_correction(self, beta: float, t: Value, k: int, dtype: DType) -> Value:
        """1 - β^t computed in ``t``'s dtype (float64), rounded once to ``dtype``. 1 - β^t cancels:
        in float32 (β2 = 0.999 held as 0.99900001) it came out 1.3e-5 short: every step ~7e-6 short."""
        wide = t.type.dtype
        beta_t = self.emit("pow", self.c(beta, t), t, hint=f"adam.beta{k}_t", what=f"β{k}^t")
        bias = self.emit("sub", self.c(1.0, t), beta_t, hint=f"adam.bias{k}" + ("" if wide is dtype else f".{wide}"),
                         what=f"1 - β{k}^t")
        if wide is dtype:
            return bias
        return self.emit("cast", bias, hint=f"adam.bias{k}", what=f"1 - β{k}^t, rounded once", dtype=dtype)


def add_optimizer(grads: Gradients, optimizer: SGD | Adam) -> TrainingStep:
    """The training step: ``grads.graph`` plus updates of every differentiated param."""
    g = grads.graph
    b = GraphBuilder.extend(g)
    lr = b.arg("lr", TensorType(grads.loss.type.dtype, ()), ArgKind.input, exact=True)
    params = {v.name: v for v in g.params}
    updates = list(g.updates)
    new_state: dict[str, np.ndarray] = {}

    def state(name: str, like: TensorType) -> Value:
        v = b.arg(name, like, ArgKind.state, exact=True)
        new_state[name] = np.zeros(like.concrete({}), dtype=like.dtype.np)
        return v

    # PyTorch's optimizers skip a parameter whose .grad is None: no weight decay, momentum or step
    left_alone = tuple(name for name in grads.independent if name in params)
    step = None
    if isinstance(optimizer, Adam):
        dtype = grads.loss.type.dtype
        step = state("adam.step", TensorType(dtype, ()))
        step_next = b.emit1("add", step, b.scalar(1.0, dtype), hint="adam.step.next", note="adam: t += 1")
        updates.append((step, step_next))
        for c in (optimizer.beta1, 1 - optimizer.beta1, optimizer.beta2, 1 - optimizer.beta2, optimizer.eps):
            b.scalar(c, dtype)  # before the float64 ones below, so these are %c0.9 and those %c0.9.f64
        u = _Updater(b, optimizer, "adam")
        why = "t in float64: 1 - β^t cancels (in float32 1 - β2^t was 1.3e-5 short)"
        t = step_next if dtype is DType.f64 else u.emit("cast", step_next, hint="adam.t", what=why, dtype=DType.f64)
        bc1, bc2 = (u.bias_correction(beta, t, k, dtype) for k, beta in ((1, optimizer.beta1), (2, optimizer.beta2)))

    for name, gv in grads.grads.items():
        if name not in params or name in left_alone:
            continue  # a gradient with respect to an input (reported, not applied), or no gradient
        p = params[name]
        if p.type.symbols:
            raise GradfuseError(f"cannot train %{name}: its shape {p.type} depends on the batch size")
        u = _Updater(b, optimizer, f"{optimizer.describe().split('(')[0]} of %{name}")
        if optimizer.weight_decay:
            gv = u.emit("add", gv, u.emit("mul", u.c(optimizer.weight_decay, p), p, hint=f"{name}.decay",
                                          what="wd·p"), hint=f"{name}.grad_wd", what="g + wd·p")
        if isinstance(optimizer, SGD):
            direction = gv
            if optimizer.momentum:
                v = state(f"{name}.momentum", p.type)
                direction = u.emit("add", u.emit("mul", u.c(optimizer.momentum, v), v, hint=f"{name}.momentum.decayed",
                                                 what="μ·v"), gv, hint=f"{name}.momentum.next", what="v = μ·v + g")
                updates.append((v, direction))
            what = "lr·v" if optimizer.momentum else "lr·g"
            step_value = u.emit("mul", lr, direction, hint=f"{name}.step", what=what)
        else:
            m, v = state(f"{name}.adam_m", p.type), state(f"{name}.adam_v", p.type)
            b1, b2 = optimizer.beta1, optimizer.beta2
            m_next = u.emit("add", u.emit("mul", u.c(b1, m), m, hint=f"{name}.adam_m.decayed", what="β1·m"),
                            u.emit("mul", u.c(1 - b1, gv), gv, hint=f"{name}.adam_m.new", what="(1-β1)·g"),
                            hint=f"{name}.adam_m.next", what="m = β1·m + (1-β1)·g")
            g2 = u.emit("mul", gv, gv, hint=f"{name}.grad_sq", what="g²")
            v_next = u.emit("add", u.emit("mul", u.c(b2, v), v, hint=f"{name}.adam_v.decayed", what="β2·v"),
                            u.emit("mul", u.c(1 - b2, g2), g2, hint=f"{name}.adam_v.new", what="(1-β2)·g²"),
                            hint=f"{name}.adam_v.next", what="v = β2·v + (1-β2)·g²")
            updates += [(m, m_next), (v, v_next)]
            mhat = u.emit("div", m_next, bc1, hint=f"{name}.mhat", what="m̂ = m / (1 - β1^t)")
            vhat = u.emit("div", v_next, bc2, hint=f"{name}.vhat", what="v̂ = v / (1 - β2^t)")
            denom = u.emit("add", u.emit("sqrt", vhat, hint=f"{name}.vhat_sqrt", what="√v̂"),
                           u.c(optimizer.eps, vhat), hint=f"{name}.denom", what="√v̂ + ε")
            step_value = u.emit("mul", lr, u.emit("div", mhat, denom, hint=f"{name}.direction", what="m̂ / (√v̂ + ε)"),
                                hint=f"{name}.step", what="lr·m̂ / (√v̂ + ε)")
        p_next = u.emit("sub", p, step_value, hint=f"{name}.next", what="p - step")
        updates.append((p, p_next))

    b.args.sort(key=lambda arg: list(ArgKind).index(arg[0]))  # inputs first, as users read signatures
    outputs = [grads.loss] + [v for v in g.outputs if v is not grads.loss and v not in grads.grads.values()]
    return TrainingStep(b.finish(outputs, updates), new_state, left_alone)


@register_pass
@dataclass(frozen=True)
class OptimizerStep(Pass):
    """Add the optimizer's update of every param to a graph that autodiff made: the graph becomes
    one whole training step (``method`` sgd or adam, with that optimizer's options)."""

    name: ClassVar[str] = "optimizer"
    method: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @classmethod
    def of(cls, optimizer: SGD | Adam) -> OptimizerStep:
        if isinstance(optimizer, Adam):
            return cls("adam", 0.0, optimizer.weight_decay, optimizer.beta1, optimizer.beta2, optimizer.eps)
        return cls("sgd", optimizer.momentum, optimizer.weight_decay)

    def optimizer(self) -> SGD | Adam:
        if self.method == "adam":
            return Adam(self.beta1, self.beta2, self.eps, self.weight_decay)
        if self.method != "sgd":
            raise GradfuseError(f"optimizer: unknown method {self.method!r} (sgd or adam)")
        return SGD(self.momentum, self.weight_decay)

    def run(self, graph: Graph) -> PassResult:
        step = add_optimizer(gradients_of(graph), self.optimizer())
        report = f"{self.optimizer().describe()}: {len(step.graph.updates) - len(graph.updates)} updated arguments"
        if step.left_alone:
            report += f"; left alone (no gradient): {', '.join('%' + n for n in step.left_alone)}"
        return PassResult(step.graph, report, step)
