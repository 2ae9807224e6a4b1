"""(Batched) matrix multiplication with numpy ``matmul`` broadcasting over leading dims."""

from __future__ import annotations

import numpy as np

from gradfuse.errors import ShapeError

from ..registry import Attr, OpDef, register
from ..types import TensorType, dims_product
from .common import FLOATS, broadcast_shapes, same_dtype


def _matmul_infer(a: TensorType, b: TensorType, *, transpose_a: bool, transpose_b: bool) -> TensorType:
    dt = same_dtype("matmul", a, b, allowed=FLOATS)
    for what, t in (("left operand", a), ("right operand", b)):
        if t.rank < 2:
            raise ShapeError(f"matmul: {what} must have rank >= 2, got {t}", hint="reshape it to a matrix")
    m, k = (a.shape[-1], a.shape[-2]) if transpose_a else (a.shape[-2], a.shape[-1])
    k2, n = (b.shape[-1], b.shape[-2]) if transpose_b else (b.shape[-2], b.shape[-1])
    if k != k2:
        raise ShapeError(f"matmul: inner dimensions differ: {a}{'ᵀ' if transpose_a else ''} @ "
                         f"{b}{'ᵀ' if transpose_b else ''} contracts {k} with {k2}")
    try:
        batch = broadcast_shapes("matmul", TensorType(dt, a.shape[:-2]), TensorType(dt, b.shape[:-2]))
    except ShapeError:
        raise ShapeError(f"matmul: cannot broadcast the batch axes of {a} and {b}",
                         hint="the leading axes must be equal or 1") from None
    return TensorType(dt, (*batch, m, n))


def _matmul_ref(a, b, *, transpose_a: bool, transpose_b: bool):
    if transpose_a:
        a = np.swapaxes(a, -1, -2)
    if transpose_b:
        b = np.swapaxes(b, -1, -2)
    return np.matmul(a, b)


def _matmul_vjp(ctx, g):
    """With y = op(a) @ op(b): dL/da and dL/db as matmuls of g, transposed to a's and b's layouts."""
    a, b = ctx.inputs
    ta, tb = ctx.attrs["transpose_a"], ctx.attrs["transpose_b"]
    ga = gb = None
    if ctx.wants(0):
        if not ta:  # dA = g·op(b)ᵀ
            ga = ctx.emit("matmul", g, b, rule="g·bᵀ" if not tb else "g·b", wrt="lhs",
                          transpose_a=False, transpose_b=not tb)
        else:  # dAᵀ = g·op(b)ᵀ  =>  dA = op(b)·gᵀ
            ga = ctx.emit("matmul", b, g, rule="b·gᵀ" if not tb else "bᵀ·gᵀ", wrt="lhs",
                          transpose_a=tb, transpose_b=True)
        ga = ctx.unbroadcast(ga, a.type, "lhs")
    if ctx.wants(1) and b.type.rank == 2 and a.type.rank > 2 and not ta:
        # a weight shared by every row of a batch ([N, T, K] @ [K, M]): one 2-D GEMM over the
        # flattened rows ([N*T, K]ᵀ·[N*T, M]) instead of a product per example summed over N
        rows = dims_product(a.type.shape[:-1])
        a2 = ctx.emit("reshape", a, rule="a as rows", wrt="rhs", shape=[rows, a.type.shape[-1]])
        g2 = ctx.emit("reshape", g, rule="g as rows", wrt="rhs", shape=[rows, g.type.shape[-1]])
        gb = (ctx.emit("matmul", a2, g2, rule="aᵀ·g over all rows", wrt="rhs", transpose_a=True, transpose_b=False)
              if not tb else
              ctx.emit("matmul", g2, a2, rule="gᵀ·a over all rows", wrt="rhs", transpose_a=True, transpose_b=False))
    elif ctx.wants(1):
        if not tb:  # dB = op(a)ᵀ·g
            gb = ctx.emit("matmul", a, g, rule="aᵀ·g" if not ta else "a·g", wrt="rhs",
                          transpose_a=not ta, transpose_b=False)
        else:  # dBᵀ = op(a)ᵀ·g  =>  dB = gᵀ·op(a)
            gb = ctx.emit("matmul", g, a, rule="gᵀ·a" if not ta else "gᵀ·aᵀ", wrt="rhs",
                          transpose_a=True, transpose_b=ta)
        gb = ctx.unbroadcast(gb, b.type, "rhs")
    return [ga, gb]


register(OpDef("matmul", "structured", _matmul_infer, _matmul_ref, arity=2,
               attrs={"transpose_a": Attr("bool", False), "transpose_b": Attr("bool", False)},
               doc="a @ b over the last two axes (optionally transposed); leading axes broadcast",
               vjp=_matmul_vjp, role="gemm", lowering={"template": "gemm"}))
