"""What training measures, decided by the model rather than by one task.

The test loss is the model's own loss, computed from its predictions by the loss graph (the
model's ``loss`` traced on a symbolic prediction, run by the reference interpreter in
float64), so it is whatever the model declares and an artifact can compute it without the
model's Python code. The other metrics follow the targets' types:

- integer labels against logits ``[..., C]``: accuracy, and top-5 accuracy where C > 10;
- integer labels of a sequence (``[N, T]`` against ``[N, T, C]``), a language model: also the
  cross-entropy of the logits in bits per token and the perplexity;
- float targets shaped like the prediction (regression): mean squared and mean absolute error.

A model may add its own: ``Model(metrics={"name": fn})``, ``fn(prediction, *targets)`` returning
the metric's mean over the examples given (numpy arrays in, a float out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import Graph
from gradfuse.ir.interpreter import interpret
from gradfuse.ir.types import DType, TensorType

EVAL_ROWS = 1024  # examples per predict call when evaluating: bounds the memory of a big test set


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # as printed: "accuracy", "bits/token"
    percent: bool = False
    fn: Callable[..., float] | None = None  # (prediction, *targets) -> mean; None: derived in evaluate()
    shown: bool = True  # in the progress line (nats are the loss's unit; bits and perplexity show them)
    custom: bool = False  # the model's own (Model(metrics=...)): plotted beside the headline


def _accuracy(pred, labels) -> float:
    return float(np.mean(pred.argmax(axis=-1) == labels))


def _top5(pred, labels) -> float:
    top = np.argpartition(pred, -5, axis=-1)[..., -5:]
    return float(np.mean(np.any(top == labels[..., None], axis=-1)))


def _nats(pred, labels) -> float:
    """Mean cross-entropy of logits in nats, per label."""
    z = pred.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(logp, labels[..., None].astype(np.int64), axis=-1).mean())


def _mse(pred, target) -> float:
    return float(np.mean((pred.astype(np.float64) - target) ** 2))


def _mae(pred, target) -> float:
    return float(np.mean(np.abs(pred.astype(np.float64) - target)))


def _measure(m: Metric, pred: np.ndarray, targets: list[np.ndarray]) -> float:
    try:
        return float(m.fn(pred, *targets))
    except Exception as e:  # a model's own metric failed: say which, in one line
        raise GradfuseError(f"metric {m.name!r} failed on predictions {pred.dtype}{list(pred.shape)}: "
                            f"{type(e).__name__}: {e}") from None


@dataclass
class Metrics:
    """The measurements of one model: ``evaluate`` runs them over a data set."""

    task: str  # "classification", "language model", "regression" or "" (none of these)
    metrics: list[Metric] = field(default_factory=list)
    headline: str | None = None  # the metric a plot shows beside the loss
    loss_graph: Graph | None = None  # (prediction, *targets) -> the model's loss

    @property
    def loss_name(self) -> str:
        """The op that computes the loss (``softmax_cross_entropy``, ``mse``), or "none"."""
        g = self.loss_graph
        return g.producers()[g.outputs[0]].op if g is not None else "none"

    def names(self) -> list[str]:
        return (["loss"] if self.loss_graph is not None else []) + [m.name for m in self.metrics]

    def evaluate(self, predict: Callable[..., np.ndarray], inputs: list[np.ndarray],
                 targets: list[np.ndarray]) -> dict[str, float]:
        """Every metric's mean over the examples (in chunks of EVAL_ROWS): ``predict(*inputs)``
        gives the predictions."""
        sums: dict[str, float] = {}
        n = len(inputs[0])
        for start in range(0, n, EVAL_ROWS):
            part = slice(start, start + EVAL_ROWS)
            pred = predict(*(x[part] for x in inputs))
            ys = [t[part] for t in targets]
            rows = len(pred)
            values = {m.name: _measure(m, pred, ys) for m in self.metrics if m.fn is not None}
            if self.loss_graph is not None:
                values["loss"] = self.loss(pred, ys)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * rows
        means = {k: v / n for k, v in sums.items()}
        if "nats" in means:
            means["bits"] = means["nats"] / math.log(2)
            means["perplexity"] = math.exp(min(means["nats"], 700.0))
        return {k: means[k] for k in self.names() if k in means}

    def loss(self, pred: np.ndarray, targets: list[np.ndarray]) -> float:
        g = self.loss_graph
        feeds = {v.name: (a.astype(np.float64) if v.type.dtype.is_float else a)
                 for v, a in zip(g.inputs, [pred, *targets], strict=True)}
        with np.errstate(all="ignore"):  # a NaN loss is reported as such
            return float(interpret(g, feeds).outputs[0])

    def describe(self, values: Mapping[str, float]) -> str:
        """``loss 0.1234  accuracy 96.1%  top-5 99.2%``."""
        by_name = {m.name: m for m in self.metrics}
        parts = []
        for k, v in values.items():
            m = by_name.get(k)
            if m is not None and not m.shown:
                continue
            if m is not None and m.percent:
                parts.append(f"{m.label} {v:.1%}")
            else:
                parts.append(f"{m.label if m else k} {v:.4g}" if k != "loss" else f"loss {v:.4f}")
        return "  ".join(parts)

    def label(self, name: str) -> str:
        return next((m.label for m in self.metrics if m.name == name), name)

    def is_percent(self, name: str) -> bool:
        return any(m.percent for m in self.metrics if m.name == name)


def for_model(prediction: TensorType, targets: Mapping[str, TensorType], loss_graph: Graph | None = None,
              custom: Mapping[str, Callable[..., float]] | None = None) -> Metrics:
    """The metrics that fit a model predicting ``prediction`` for ``targets``."""
    task, metrics, headline = "", [], None
    (target,) = targets.values() if len(targets) == 1 else (None,)
    if target is not None and not target.dtype.is_float and prediction.dtype.is_float \
            and prediction.rank >= 2 and target.shape == prediction.shape[:-1]:
        metrics = [Metric("accuracy", "accuracy", percent=True, fn=_accuracy)]
        classes = prediction.shape[-1]
        if isinstance(classes, int) and classes > 10:
            metrics.append(Metric("top5_accuracy", "top-5", percent=True, fn=_top5))
        task, headline = "classification", "accuracy"
        if target.rank >= 2:  # a label per position: a sequence model
            metrics += [Metric("nats", "nats/token", fn=_nats, shown=False), Metric("bits", "bits/token"),
                        Metric("perplexity", "perplexity")]
            task, headline = "language model", "bits"
    elif target is not None and target.dtype.is_float and target.shape == prediction.shape:
        metrics = [Metric("mse", "mse", fn=_mse), Metric("mae", "mae", fn=_mae)]
        task, headline = "regression", "mae"
    for name, fn in (custom or {}).items():
        metrics.append(Metric(name, name, fn=fn, custom=True))
        headline = headline or name
    if loss_graph is not None and loss_graph.inputs[0].type.dtype is not DType.f64:
        from gradfuse.passes.precision import with_float

        loss_graph = with_float(loss_graph, DType.f64)
    return Metrics(task, metrics, headline, loss_graph)
