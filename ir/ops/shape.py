"""Ops that move data without arithmetic: reshape, transpose, broadcast, slice, concat."""

from __future__ import annotations

from collections import Counter

import numpy as np

from gradfuse.errors import ShapeError

from ..registry import Attr, OpDef, register
from ..types import Dim, DType, TensorType, dim_factors, format_shape
from .common import broadcast_shapes, check_axis, same_dtype


def _size_key(shape: tuple[Dim, ...]):
    """Element count of a shape as (symbol multiset, product of the int dims)."""
    syms, ints = Counter(), 1
    for d in shape:
        s, k = dim_factors(d)
        syms.update(s)
        ints *= k
    return syms, ints


def _reshape_infer(x: TensorType, *, shape) -> TensorType:
    if _size_key(x.shape) != _size_key(shape):
        raise ShapeError(f"reshape: cannot reshape {x} to {format_shape(shape)}: the element counts differ")
    return x.with_shape(shape)


def _reshape_vjp(ctx, g):
    return [ctx.emit("reshape", g, rule="g reshaped back", shape=list(ctx.inputs[0].type.shape))]


register(OpDef("reshape", "shape", _reshape_infer, lambda x, *, shape: x.reshape(shape), arity=1,
               attrs={"shape": Attr("dims")}, doc="same elements in row-major order, new shape", vjp=_reshape_vjp,
               role="view"))


def _transpose_infer(x: TensorType, *, perm) -> TensorType:
    if sorted(perm) != list(range(x.rank)):
        raise ShapeError(f"transpose: perm {list(perm)} is not a permutation of the {x.rank} axes of {x}")
    return x.with_shape([x.shape[p] for p in perm])


# ---- loop nests (the builder of codegen/loop_nests.py: b.loop, b.load, b.store, b.at) -------------
def _transpose_nest(b, n):
    perm = n.attrs["perm"]
    with b.loop(n.outputs[0].type.shape) as i:
        src = [None] * len(perm)
        for out_axis, in_axis in enumerate(perm):
            src[in_axis] = i[out_axis]
        b.store(n.outputs[0], i, b.load(n.inputs[0], src))


def _broadcast_nest(b, n):
    x, y = n.inputs[0], n.outputs[0]
    off = y.type.rank - x.type.rank
    with b.loop(y.type.shape) as i:
        src = [0 if d == 1 and y.type.shape[off + j] != 1 else i[off + j] for j, d in enumerate(x.type.shape)]
        b.store(y, i, b.load(x, src))


def _strided(i: list, a, b) -> list:
    """``i`` with the sliced axis at ``start + i * step``."""
    out = list(i)
    out[a["axis"]] = b.at(i[a["axis"]], a["step"], a["start"])
    return out


def _slice_nest(b, n):
    with b.loop(n.outputs[0].type.shape) as i:
        b.store(n.outputs[0], i, b.load(n.inputs[0], _strided(i, n.attrs, b)))


def _slice_grad_nest(b, n):
    b.fill(n.outputs[0], "0")
    with b.loop(n.inputs[0].type.shape) as i:
        b.store(n.outputs[0], _strided(i, n.attrs, b), b.load(n.inputs[0], i))


def _concat_nest(b, n):
    axis, offset = n.attrs["axis"], 0
    for v in n.inputs:
        with b.loop(v.type.shape) as i:
            dst = list(i)
            dst[axis] = b.at(i[axis], 1, offset)
            b.store(n.outputs[0], dst, b.load(v, i))
        offset += v.type.shape[axis]


def _transpose_vjp(ctx, g):
    inverse = list(np.argsort(ctx.attrs["perm"]).tolist())
    return [ctx.emit("transpose", g, rule="g with the inverse permutation", perm=inverse)]


register(OpDef("transpose", "shape", _transpose_infer, lambda x, *, perm: np.transpose(x, perm), arity=1,
               attrs={"perm": Attr("ints")}, doc="permute axes: out.shape[i] = x.shape[perm[i]]", vjp=_transpose_vjp,
               role="layout", lowering={"nest": _transpose_nest}))


def _broadcast_infer(x: TensorType, *, shape) -> TensorType:
    target = x.with_shape(shape)
    if x.rank > len(shape) or broadcast_shapes("broadcast_to", x, target) != tuple(shape):
        raise ShapeError(f"broadcast_to: cannot broadcast {x} to {format_shape(shape)}")
    return target


register(OpDef("broadcast_to", "shape", _broadcast_infer,
               lambda x, *, shape: np.array(np.broadcast_to(x, shape)), arity=1,
               attrs={"shape": Attr("dims")}, doc="repeat size-1 (or missing leading) axes",
               vjp=lambda ctx, g: [ctx.unbroadcast(g, ctx.inputs[0].type)], role="layout",
               lowering={"nest": _broadcast_nest}))


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


def _slice_vjp(ctx, g):
    a = ctx.attrs
    size = ctx.inputs[0].type.shape[a["axis"]]
    return [ctx.emit("slice_grad", g, rule=f"g placed at [{a['start']}:{a['stop']}:{a['step']}], zeros elsewhere",
                     axis=a["axis"], start=a["start"], stop=a["stop"], step=a["step"], size=size)]


_SLICE_ATTRS = {"axis": Attr("int"), "start": Attr("int"), "stop": Attr("int"), "step": Attr("int", 1)}
register(OpDef("slice", "shape", _slice_infer, _slice_ref, arity=1, attrs=_SLICE_ATTRS,
               doc="x[start:stop:step] along one axis (normalised: 0 <= start <= stop <= size)", vjp=_slice_vjp,
               role="layout", lowering={"nest": _slice_nest}))


def _slice_grad_infer(g: TensorType, *, axis, start, stop, step, size) -> TensorType:
    shape = list(g.shape)
    check_axis("slice_grad", g, axis)
    shape[axis] = size
    out = g.with_shape(shape)
    if _slice_infer(out, axis=axis, start=start, stop=stop, step=step) != g:
        raise ShapeError(f"slice_grad: {g} is not the slice [{start}:{stop}:{step}] of axis {axis} of {out}")
    return out


def _slice_grad_ref(g, *, axis, start, stop, step, size):
    shape = list(g.shape)
    shape[axis] = size
    out = np.zeros(shape, dtype=g.dtype)
    index = [slice(None)] * g.ndim
    index[axis] = slice(start, stop, step)
    out[tuple(index)] = g
    return out


register(OpDef("slice_grad", "shape", _slice_grad_infer, _slice_grad_ref, arity=1,
               attrs={**_SLICE_ATTRS, "size": Attr("int")},
               doc="the transpose of slice: g written into [start:stop:step] of a zero tensor with `size` along axis",
               vjp=lambda ctx, g: [ctx.emit("slice", g, rule="the slice of g", **{
                   k: ctx.attrs[k] for k in ("axis", "start", "stop", "step")})],
               lowering={"nest": _slice_grad_nest}))


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


def _concat_vjp(ctx, g):
    axis, start, out = ctx.attrs["axis"], 0, []
    for i, x in enumerate(ctx.inputs):
        stop = start + x.type.shape[axis]
        out.append(ctx.emit("slice", g, rule=f"g[{start}:{stop}] along axis {axis}", wrt=f"operand {i}",
                            axis=axis, start=start, stop=stop, step=1) if ctx.wants(i) else None)
        start = stop
    return out


register(OpDef("concat", "shape", _concat_infer, lambda *xs, axis: np.concatenate(xs, axis=axis), arity=None,
               attrs={"axis": Attr("int")}, doc="join tensors along an existing axis", vjp=_concat_vjp,
               role="layout", lowering={"nest": _concat_nest}))
