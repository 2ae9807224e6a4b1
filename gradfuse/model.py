"""What gradfuse needs to know about a model besides its layers: the input signature, and,
for training, the targets, the loss and the data. ``trace`` turns it into a graph."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from gradfuse.errors import GradfuseError, ShapeError
from gradfuse.ir.graph import ArgKind, Graph
from gradfuse.ir.types import DType, TensorType, as_type
from gradfuse.nn import Module
from gradfuse.state_dict import LoadResult, check_state
from gradfuse.tensor import Tensor
from gradfuse.tracing import Tracer, tracing, user_frame


def snake_case(name: str) -> str:
    """``DigitsMLP`` -> ``digits_mlp``, for graph names."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def float_dtype(dtype) -> DType:
    """``"f32"``/``"f64"``/a DType/a numpy float dtype as a float DType, or a GradfuseError."""
    try:
        d = DType.of(dtype)
    except TypeError:
        d = None
    if d is None or not d.is_float:
        raise GradfuseError(f"dtype={dtype!r}: gradfuse computes in 'f32' or 'f64'")
    return d


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
    arrays ``x_train, y_train, x_test, y_test`` for the training commands (gradfuse/data.py);
    ``metrics`` (optional) adds measurements to the ones the targets call for
    (gradfuse/metrics.py): ``{"name": fn(prediction, *targets) -> float}`` on numpy arrays.
    """

    net: Module
    inputs: Mapping[str, str | TensorType]
    targets: Mapping[str, str | TensorType] = field(default_factory=dict)
    loss: Callable[..., Tensor] | None = None
    data: Callable[[], dict[str, np.ndarray]] | None = None
    seed: int = 0
    name: str | None = None
    metrics: Mapping[str, Callable[..., float]] | None = None

    def __post_init__(self):
        if not isinstance(self.net, Module):
            raise GradfuseError(f"Model(net=...) must be a gradfuse.nn.Module, got {type(self.net).__name__}")
        self.inputs = _signature(self.inputs, "input")
        self.targets = _signature(self.targets, "target")
        self.name = self.name or snake_case(type(self.net).__name__)
        self.defined_at = user_frame()  # where the loss is attributed in the IR

    _loaded: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def initial_values(self, dtype: str | DType | None = None) -> dict[str, np.ndarray]:
        """The values compiling starts from: the layers' initialisers (from ``seed``), replaced
        by what :meth:`load_state_dict` loaded. Each array has its tensor's dtype, or with
        ``dtype`` (``"f64"``: what ``gradfuse.compile(..., dtype=...)`` asks) every float one
        has that dtype, converted from the values as loaded (float64 loaded stays exact in f64)."""
        want = None if dtype is None else float_dtype(dtype)
        values = self.net.initial_values(self.seed)
        out = {}
        for name, p in self.net.named_tensors():
            value = self._loaded.get(name, values[name])
            target = want if want is not None and p.dtype.is_float else p.dtype
            out[name] = value.astype(target.np)  # a copy: training never writes into the model
        return out

    def tensor_types(self) -> dict[str, TensorType]:
        """Every parameter and buffer's type, by dotted path: what a state_dict must hold."""
        return {name: TensorType(p.dtype, p.shape) for name, p in self.net.named_tensors()}

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True) -> LoadResult:
        """Start from these weights: ``state`` maps each parameter and buffer's dotted path
        (``fc1.weight``, ``norm.running_mean``; see ``net.named_tensors()``) to an array of its
        shape, e.g. ``CompiledModel.state_dict()``. Float arrays of any precision are accepted for
        float tensors and kept as given: ``initial_values()`` converts them to the tensor's dtype
        (f32: like PyTorch's load_state_dict, which copies into the existing dtype), an f64 compile
        to float64. ``strict=False`` keeps the current value of a missing entry and ignores
        unexpected ones; a mis-shaped or mis-typed entry is an error either way.

        Raises :class:`gradfuse.state_dict.StateDictError` naming every missing, unexpected and
        mis-shaped entry. A PyTorch state_dict needs :func:`gradfuse.from_pytorch` first (Linear
        weights are [out, in] there): a square weight would otherwise load in the wrong layout."""
        arrays, result = check_state(state, self.tensor_types(), strict=strict, what=f"model {self.name}")
        self._loaded.update(arrays)
        return result

    def trace(self, *, train: bool = False, with_loss: bool = False) -> Graph:
        """The forward graph: outputs ``(prediction,)``, or ``(loss, prediction)`` with the loss.

        ``train=True`` records training behaviour (dropout, batch statistics with their
        running-statistics updates)."""
        if with_loss and self.loss is None:
            raise GradfuseError(f"model {self.name} has no loss: pass loss=... to gradfuse.Model")
        return trace(self.net, self.inputs, name=self.name, train=train, seed=self.seed,
                     targets=self.targets if with_loss else None, loss=self.loss if with_loss else None,
                     loss_loc=self.defined_at)


class _Prediction(Module):
    def forward(self, prediction):
        return prediction


def trace_loss(model: Model, prediction: TensorType) -> Graph:
    """The model's loss alone, ``(prediction, *targets) -> (loss, prediction)``: what evaluation
    runs on predictions (and an artifact carries, so it needs no Python code for it)."""
    if model.loss is None:
        raise GradfuseError(f"model {model.name} has no loss: pass loss=... to gradfuse.Model")
    return trace(_Prediction(), {"prediction": prediction}, name=f"{model.name}_loss", targets=model.targets,
                 loss=model.loss, loss_loc=model.defined_at)


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
