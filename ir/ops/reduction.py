"""Reductions over a sorted list of axes (``keepdims`` keeps them as size 1)."""

from __future__ import annotations

import numpy as np

from ..registry import Attr, OpDef, register
from ..types import TensorType
from .common import FLOATS, NUMERIC, check_axes, same_dtype

_ATTRS = {"axes": Attr("ints", doc="sorted, distinct, non-negative"), "keepdims": Attr("bool", False)}


def reduced_shape(t: TensorType, axes, keepdims: bool):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(t.shape))
    return tuple(d for i, d in enumerate(t.shape) if i not in axes)


def _reduction(name: str, fn, allowed, doc: str) -> OpDef:
    def infer(x: TensorType, *, axes, keepdims) -> TensorType:
        same_dtype(name, x, allowed=allowed)
        check_axes(name, x, axes)
        return TensorType(x.dtype, reduced_shape(x, axes, keepdims))

    def ref(x, *, axes, keepdims):
        return np.asarray(fn(x, axis=axes, keepdims=keepdims)).astype(x.dtype, copy=False)

    return register(OpDef(name, "reduction", infer, ref, arity=1, attrs=_ATTRS, doc=doc))


_reduction("sum", np.sum, NUMERIC, "sum over axes")
_reduction("mean", np.mean, FLOATS, "arithmetic mean over axes")
_reduction("max", np.max, NUMERIC, "maximum over axes; the gradient goes to every maximal element")
