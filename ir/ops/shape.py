"""Ops that move data without arithmetic: reshape, transpose, broadcast, slice, concat."""

from __future__ import annotations

from collections import Counter

import numpy as np

from gradfuse.errors import ShapeError

from ..registry import Attr, OpDef, register
from ..types import Dim, DType, TensorType, format_shape
from .common import broadcast_shapes, check_axis, same_dtype


def _size_key(shape: tuple[Dim, ...]):
    """Element count of a shape as (symbol multiset, product of the int dims)."""
    ints = int(np.prod([d for d in shape if isinstance(d, int)], dtype=np.int64))
    return Counter(d for d in shape if isinstance(d, str)), ints


def _reshape_infer(x: TensorType, *, shape) -> TensorType:
    if _size_key(x.shape) != _size_key(shape):
        raise ShapeError(f"reshape: cannot reshape {x} to {format_shape(shape)}: the element counts differ")
    return x.with_shape(shape)


register(OpDef("reshape", "shape", _reshape_infer, lambda x, *, shape: x.reshape(shape), arity=1,
               attrs={"shape": Attr("dims")}, doc="same elements in row-major order, new shape"))


def _transpose_infer(x: TensorType, *, perm) -> TensorType:
    if sorted(perm) != list(range(x.rank)):
        raise ShapeError(f"transpose: perm {list(perm)} is not a permutation of the {x.rank} axes of {x}")
    return x.with_shape([x.shape[p] for p in perm])


register(OpDef("transpose", "shape", _transpose_infer, lambda x, *, perm: np.transpose(x, perm), arity=1,
               attrs={"perm": Attr("ints")}, doc="permute axes: out.shape[i] = x.shape[perm[i]]"))


def _broadcast_infer(x: TensorType, *, shape) -> TensorType:
    target = x.with_shape(shape)
    if x.rank > len(shape) or broadcast_shapes("broadcast_to", x, target) != tuple(shape):
        raise ShapeError(f"broadcast_to: cannot broadcast {x} to {format_shape(shape)}")
    return target


register(OpDef("broadcast_to", "shape", _broadcast_infer,
               lambda x, *, shape: np.ascontiguousarray(np.broadcast_to(x, shape)), arity=1,
               attrs={"shape": Attr("dims")}, doc="repeat size-1 (or missing leading) axes"))


def _slice_infer(x: TensorType, *, axis: int, start: int, stop: int, step: int) -> TensorType:
    check_axis("slice", x, axis)
    size = x.shape[axis]
    if isinstance(size, str):
        raise ShapeError(f"slice: cannot slice the symbolic axis {axis} ({size}) of {x}",
                         hint="slicing the batch dimension is not supported; slice feature axes")
    if step < 1 or not 0 <= start <= stop <= size:
        raise ShapeError(f"slice: [{start}:{stop}:{step}] is not a valid slice of axis {axis} (size {size}) of {x}")
    shape = list(x.shape)
    shape[axis] = len(range(start, stop, step))
    return x.with_shape(shape)


def _slice_ref(x, *, axis, start, stop, step):
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop, step)
    return np.ascontiguousarray(x[tuple(index)])


register(OpDef("slice", "shape", _slice_infer, _slice_ref, arity=1,
               attrs={"axis": Attr("int"), "start": Attr("int"), "stop": Attr("int"), "step": Attr("int", 1)},
               doc="x[start:stop:step] along one axis (normalised: 0 <= start <= stop <= size)"))


def _concat_infer(*xs: TensorType, axis: int) -> TensorType:
    dt = same_dtype("concat", *xs, allowed=tuple(DType))
    first = xs[0]
    check_axis("concat", first, axis)
    total: Dim = 0
    for x in xs:
        if x.rank != first.rank or any(a != b for i, (a, b) in enumerate(zip(x.shape, first.shape, strict=True))
                                       if i != axis):
            raise ShapeError(f"concat: {x} does not match {first} outside axis {axis}")
        if isinstance(x.shape[axis], str):
            raise ShapeError(f"concat: cannot concatenate along the symbolic axis {axis} of {x}")
        total += x.shape[axis]
    shape = list(first.shape)
    shape[axis] = total
    return TensorType(dt, shape)


register(OpDef("concat", "shape", _concat_infer, lambda *xs, axis: np.concatenate(xs, axis=axis), arity=None,
               attrs={"axis": Attr("int")}, doc="join tensors along an existing axis"))
