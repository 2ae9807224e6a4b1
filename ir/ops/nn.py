"""Composite neural-network ops kept whole in the IR: softmax, losses, normalisations, embedding.

They stay single ops so that their closed-form gradients (softmax + cross-entropy: ``p - y``)
and their fused row-reduction kernels remain visible; a pass may decompose them.
"""

from __future__ import annotations

import numpy as np

from gradfuse.errors import InputError, ShapeError

from ..registry import Attr, OpDef, register
from ..types import DType, TensorType
from .common import FLOATS, check_axis, require_dtype, require_rank, same_dtype

INTS = (DType.i32, DType.i64)


# ---- softmax family ----------------------------------------------------------------------
def _softmax_infer(name):
    def infer(x: TensorType, *, axis: int) -> TensorType:
        same_dtype(name, x, allowed=FLOATS)
        check_axis(name, x, axis)
        return x

    return infer


def log_softmax_ref(x, axis: int):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


register(OpDef("softmax", "structured", _softmax_infer("softmax"),
               lambda x, *, axis: np.exp(log_softmax_ref(x, axis)).astype(x.dtype), arity=1,
               attrs={"axis": Attr("int")}, doc="exp(x) / sum(exp(x)) along axis"))
register(OpDef("log_softmax", "structured", _softmax_infer("log_softmax"),
               lambda x, *, axis: log_softmax_ref(x, axis).astype(x.dtype), arity=1,
               attrs={"axis": Attr("int")}, doc="x - logsumexp(x) along axis"))


# ---- losses (mean over every example) ----------------------------------------------------
def _xent_infer(logits: TensorType, labels: TensorType) -> TensorType:
    same_dtype("softmax_cross_entropy", logits, allowed=FLOATS)
    require_dtype("softmax_cross_entropy", "labels", labels, INTS)
    if logits.rank < 1 or labels.shape != logits.shape[:-1]:
        raise ShapeError(f"softmax_cross_entropy: labels {labels} do not match logits {logits} "
                         f"(expected labels of shape [{','.join(map(str, logits.shape[:-1]))}])",
                         hint="labels are class indices, one per row of logits, not one-hot vectors")
    return TensorType(logits.dtype, ())


def xent_ref(logits, labels):
    classes = logits.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise InputError(f"softmax_cross_entropy: a label is outside [0, {classes}): "
                         f"min {labels.min()}, max {labels.max()}")
    logp = log_softmax_ref(logits, -1)
    picked = np.take_along_axis(logp, labels[..., None].astype(np.int64), axis=-1)
    return np.asarray(-picked.mean(), dtype=logits.dtype)


register(OpDef("softmax_cross_entropy", "structured", _xent_infer, xent_ref, arity=2,
               doc="mean over rows of -log softmax(logits)[label]; labels are integer classes"))


def _mse_infer(pred: TensorType, target: TensorType) -> TensorType:
    dt = same_dtype("mse", pred, target, allowed=FLOATS)
    if pred.shape != target.shape:
        raise ShapeError(f"mse: prediction {pred} and target {target} have different shapes")
    return TensorType(dt, ())


register(OpDef("mse", "structured", _mse_infer,
               lambda p, t: np.asarray(np.mean((p - t) ** 2), dtype=p.dtype), arity=2,
               doc="mean over every element of (pred - target)^2"))


# ---- normalisation -----------------------------------------------------------------------
def _affine_params(op: str, x: TensorType, *params: TensorType) -> None:
    features = x.shape[-1]
    for p in params:
        same_dtype(op, x, p, allowed=FLOATS)
        if p.shape != (features,):
            raise ShapeError(f"{op}: parameter {p} should be {x.dtype}[{features}] to match the last axis of {x}")


def _layer_norm_infer(x: TensorType, gamma: TensorType, beta: TensorType, *, eps: float) -> TensorType:
    require_rank("layer_norm", "input", x, tuple(range(1, 9)))
    _affine_params("layer_norm", x, gamma, beta)
    return x


def layer_norm_ref(x, gamma, beta, *, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps) * gamma + beta).astype(x.dtype)


register(OpDef("layer_norm", "structured", _layer_norm_infer, layer_norm_ref, arity=3,
               attrs={"eps": Attr("float", 1e-5)},
               doc="normalise over the last axis to zero mean and unit variance, then scale and shift"))


def _batch_norm_check(op, x, gamma, beta, mean, var):
    if x.rank < 2:
        raise ShapeError(f"{op}: input must have a batch axis and a feature axis, got {x}")
    _affine_params(op, x, gamma, beta, mean, var)


def _bn_train_infer(x, gamma, beta, mean, var, *, momentum: float, eps: float):
    _batch_norm_check("batch_norm_train", x, gamma, beta, mean, var)
    return x, mean, var


def bn_train_ref(x, gamma, beta, running_mean, running_var, *, momentum, eps):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    var = ((x - mean) ** 2).mean(axis=axes)
    count = x.size // x.shape[-1]
    unbiased = var * (count / max(count - 1, 1))
    y = ((x - mean) / np.sqrt(var + eps) * gamma + beta).astype(x.dtype)
    new_mean = ((1 - momentum) * running_mean + momentum * mean).astype(x.dtype)
    new_var = ((1 - momentum) * running_var + momentum * unbiased).astype(x.dtype)
    return y, new_mean, new_var


register(OpDef("batch_norm_train", "structured", _bn_train_infer, bn_train_ref, arity=5,
               attrs={"momentum": Attr("float", 0.1), "eps": Attr("float", 1e-5)},
               output_names=("out", "running_mean", "running_var"),
               doc="normalise each feature (last axis) with the batch's mean and variance; also returns "
                   "the running statistics updated with momentum (unbiased variance, as PyTorch)"))


def _bn_infer_infer(x, gamma, beta, mean, var, *, eps: float):
    _batch_norm_check("batch_norm_infer", x, gamma, beta, mean, var)
    return x


register(OpDef("batch_norm_infer", "structured", _bn_infer_infer,
               lambda x, g, b, m, v, *, eps: ((x - m) / np.sqrt(v + eps) * g + b).astype(x.dtype), arity=5,
               attrs={"eps": Attr("float", 1e-5)},
               doc="normalise each feature with the running statistics (inference mode)"))


# ---- lookup ------------------------------------------------------------------------------
def _embedding_infer(table: TensorType, ids: TensorType) -> TensorType:
    require_rank("embedding", "table", table, 2)
    same_dtype("embedding", table, allowed=FLOATS)
    require_dtype("embedding", "ids", ids, INTS)
    return TensorType(table.dtype, (*ids.shape, table.shape[1]))


def embedding_ref(table, ids):
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise InputError(f"embedding: an id is outside [0, {table.shape[0]}): min {ids.min()}, max {ids.max()}")
    return table[ids]


register(OpDef("embedding", "structured", _embedding_infer, embedding_ref, arity=2,
               doc="rows of table picked by integer ids: out[..., :] = table[ids[...], :]"))
