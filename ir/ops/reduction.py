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


def _reduction(name: str, fn, allowed, doc: str, vjp, lowering) -> OpDef:
    def infer(x: TensorType, *, axes, keepdims) -> TensorType:
        same_dtype(name, x, allowed=allowed)
        check_axes(name, x, axes)
        return TensorType(x.dtype, reduced_shape(x, axes, keepdims))

    def ref(x, *, axes, keepdims):
        return np.asarray(fn(x, axis=axes, keepdims=keepdims)).astype(x.dtype, copy=False)

    return register(OpDef(name, "reduction", infer, ref, arity=1, attrs=_ATTRS, doc=doc, vjp=vjp, lowering=lowering))


def _sum_vjp(ctx, g):
    (x,) = ctx.inputs
    return [ctx.broadcast_back(g, x, ctx.attrs["axes"], ctx.attrs["keepdims"])]


def _mean_vjp(ctx, g):
    (x,) = ctx.inputs
    n = ctx.emit("count", x, rule="n = elements per mean", axes=ctx.attrs["axes"])
    spread = ctx.broadcast_back(g, x, ctx.attrs["axes"], ctx.attrs["keepdims"])
    return [ctx.emit("div", spread, n, rule="g / n")]


def _max_vjp(ctx, g):
    """Ties share the gradient evenly (the subgradient numpy's and PyTorch's ``amax`` use): each of
    the k maximal elements of a group gets g / k, so the gradients still sum to g."""
    (x,) = ctx.inputs
    (y,) = ctx.outputs
    axes, keepdims = ctx.attrs["axes"], ctx.attrs["keepdims"]
    mask = ctx.emit("eq", x, ctx.broadcast_back(y, x, axes, keepdims), rule="x == max",
                    hint=f"{y.name}.argmax")
    ties = ctx.emit("sum", ctx.emit("cast", mask, rule="1 at the maximal elements", dtype=g.type.dtype),
                    rule="k = maximal elements per group", hint=f"{y.name}.ties", axes=axes, keepdims=keepdims)
    share = ctx.emit("div", g, ties, rule="g / k")
    return [ctx.emit("where", mask, ctx.broadcast_back(share, x, axes, keepdims), ctx.const(0.0, g),
                     rule="g / k at each of the k maximal elements")]


def _max(x, *, axis, keepdims):
    """np.max from the identity (``initial``): -inf for floats, the dtype's least for ints, which
    is also what a reduction over no elements (an empty axis) gives, as the kernels compute it."""
    lowest = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    return np.max(x, axis=axis, keepdims=keepdims, initial=lowest)


_SUM = {"combine": "{a} + {b}", "identity": "0"}
_reduction("sum", np.sum, NUMERIC, "sum over axes", _sum_vjp, _SUM)
_reduction("mean", np.mean, FLOATS, "arithmetic mean over axes", _mean_vjp, {**_SUM, "finish": "mean"})
_reduction("max", _max, NUMERIC, "maximum over axes; tied maximal elements share the gradient evenly", _max_vjp,
           {"combine": "({a} if {a} > {b} or {a} != {a} else {b})", "identity": "lowest"})  # NaN propagates


def _count_infer(x: TensorType, *, axes) -> TensorType:
    same_dtype("count", x, allowed=FLOATS)
    check_axes("count", x, axes)
    return TensorType(x.dtype, ())


register(OpDef("count", "reduction", _count_infer,
               lambda x, *, axes: np.asarray(np.prod([x.shape[a] for a in axes]), dtype=x.dtype), arity=1,
               attrs={"axes": Attr("ints")}, doc="the number of elements over axes, as a float (reads only "
                                                  "the shape, which may hold the batch size N)",
               nondiff="depends only on the shape", role="immediate", lowering={"immediate": "count"}))
