"""(Batched) matrix multiplication with numpy ``matmul`` broadcasting over leading dims."""

from __future__ import annotations

import numpy as np

from gradfuse.errors import ShapeError

from ..registry import Attr, OpDef, register
from ..types import TensorType
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
    batch = broadcast_shapes("matmul", TensorType(dt, a.shape[:-2]), TensorType(dt, b.shape[:-2]))
    return TensorType(dt, (*batch, m, n))


def _matmul_ref(a, b, *, transpose_a: bool, transpose_b: bool):
    if transpose_a:
        a = np.swapaxes(a, -1, -2)
    if transpose_b:
        b = np.swapaxes(b, -1, -2)
    return np.matmul(a, b)


register(OpDef("matmul", "structured", _matmul_infer, _matmul_ref, arity=2,
               attrs={"transpose_a": Attr("bool", False), "transpose_b": Attr("bool", False)},
               doc="a @ b over the last two axes (optionally transposed); leading axes broadcast"))
