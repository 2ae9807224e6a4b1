"""What gradfuse needs to know about a model besides its layers: the input signature, and,
for training, the targets, the loss and the data. ``trace`` turns it into a graph."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from gradfuse.errors import GradfuseError, ShapeError
from gradfuse.ir.graph import ArgKind, Graph
from gradfuse.ir.types import TensorType, as_type
from gradfuse.nn import Module
from gradfuse.tensor import Tensor
from gradfuse.tracing import Tracer, tracing, user_frame


def snake_case(name: str) -> str:
    """``DigitsMLP`` -> ``digits_mlp``, for graph names."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _signature(spec: Mapping[str, str | TensorType], what: str) -> dict[str, TensorType]:
    out = {}
    for name, t in spec.items():
        try:
            out[name] = as_type(t)
        except (TypeError, ValueError) as e:
            raise GradfuseError(f"{what} {name!r}: {e}") from None
    return out


@dataclass
class Model:
    """A network with its input signature, e.g.
    ``Model(MLP(), inputs={"x": "f32[N,64]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy)``.

    ``loss(output, *targets)`` returns a scalar; ``data()`` (optional) returns a dict of numpy
    arrays ``x_train, y_train, x_test, y_test`` for the training commands.
    """

    net: Module
    inputs: Mapping[str, str | TensorType]
    targets: Mapping[str, str | TensorType] = field(default_factory=dict)
    loss: Callable[..., Tensor] | None = None
    data: Callable[[], dict[str, np.ndarray]] | None = None
    seed: int = 0
    name: str | None = None

    def __post_init__(self):
        if not isinstance(self.net, Module):
            raise GradfuseError(f"Model(net=...) must be a gradfuse.nn.Module, got {type(self.net).__name__}")
        self.inputs = _signature(self.inputs, "input")
        self.targets = _signature(self.targets, "target")
        self.name = self.name or snake_case(type(self.net).__name__)
        self.defined_at = user_frame()  # where the loss is attributed in the IR

    def initial_values(self) -> dict[str, np.ndarray]:
        return self.net.initial_values(self.seed)

    def trace(self, *, train: bool = False, with_loss: bool = False) -> Graph:
        """The forward graph: outputs ``(prediction,)``, or ``(loss, prediction)`` with the loss.

        ``train=True`` records training behaviour (dropout, batch statistics with their
        running-statistics updates)."""
        if with_loss and self.loss is None:
            raise GradfuseError(f"model {self.name} has no loss: pass loss=... to gradfuse.Model")
        return trace(self.net, self.inputs, name=self.name, train=train, seed=self.seed,
                     targets=self.targets if with_loss else None, loss=self.loss if with_loss else None,
                     loss_loc=self.defined_at)


def trace(net: Module, inputs: Mapping[str, str | TensorType], *, name: str = "model", train: bool = False,
          seed: int = 0, targets: Mapping[str, str | TensorType] | None = None,
          loss: Callable[..., Tensor] | None = None, loss_loc: tuple[str, int] | None = None) -> Graph:
    """Run ``net`` on symbolic tensors and return the recorded graph (verified)."""
    tracer = Tracer(name, train=train, seed=seed)
    for path, module in net.named_modules():
        object.__setattr__(module, "_path", path)
    with tracing(tracer):
        args = [Tensor(tracer.argument(n, t, ArgKind.input)) for n, t in _signature(inputs, "input").items()]
        target_args = [Tensor(tracer.argument(n, t, ArgKind.input))
                       for n, t in _signature(targets or {}, "target").items()]
        for path, p in net.named_tensors():
            tracer.tensors[path] = Tensor(tracer.argument(path, TensorType(p.dtype, p.shape), p.kind))
        out = net(*args)
        if not isinstance(out, Tensor):
            raise GradfuseError(f"{type(net).__name__}.forward must return one tensor, got {type(out).__name__}")
        outputs = [out.value]
        if loss is not None:
            tracer.loc_override = loss_loc
            with tracer.layer("loss", getattr(loss, "__name__", "loss")):
                value = loss(out, *target_args)
            if not isinstance(value, Tensor) or value.ndim != 0:
                got = value.type if isinstance(value, Tensor) else type(value).__name__
                raise ShapeError(f"the loss must be a scalar tensor, got {got}").located(tracer.where())
            outputs.insert(0, value.value)
    return tracer.builder.finish(outputs, tracer.updates)
