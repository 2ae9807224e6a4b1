"""Counter-based randomness: dropout masks drawn from a hash of (seed, stream, step, index).

No generator state lives anywhere: the mask of element ``i`` at training step ``step`` is a pure
function of four integers, so the reference interpreter, the CPU kernels and the CUDA kernels
all draw the same mask, and the backward pass re-draws it instead of saving it.
"""

from __future__ import annotations

import numpy as np

from gradfuse.errors import ShapeError

from ..registry import Attr, OpDef, register
from ..types import DType, TensorType
from .common import FLOATS, same_dtype

_M32 = 0xFFFFFFFF


def hash32(x):
    """A 32-bit avalanche hash (Wellons' "lowbias32"); works on numpy uint32 arrays and ints."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):  # multiplication modulo 2^32 is the point
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))


def counter_uniform(seed: int, stream: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform floats in [0, 1) with 24 random bits, one per element of ``shape``."""
    key = hash32(np.uint32(seed & _M32) ^ hash32(np.uint32((stream * 0x9E3779B9 + step) & _M32)))
    index = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.uint64).astype(np.uint32)
    bits = hash32(index ^ key)
    return ((bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)).reshape(shape)


def _dropout_infer(x: TensorType, step: TensorType, *, p: float, seed: int, stream: int) -> TensorType:
    same_dtype("dropout", x, allowed=FLOATS)
    if step.dtype is not DType.i64 or step.rank != 0:
        raise ShapeError(f"dropout: step must be an i64[] scalar, got {step}")
    if not 0.0 <= p < 1.0:
        raise ShapeError(f"dropout: p={p} is not a probability in [0, 1)")
    return x


def dropout_ref(x, step, *, p: float, seed: int, stream: int):
    keep = counter_uniform(seed, stream, int(step), x.shape) >= np.float32(p)
    return np.where(keep, x / x.dtype.type(1.0 - p), x.dtype.type(0)).astype(x.dtype, copy=False)


register(OpDef("dropout", "elementwise", _dropout_infer, dropout_ref, arity=2,
               attrs={"p": Attr("float"), "seed": Attr("int"), "stream": Attr("int")},
               doc="zero each element with probability p and scale the rest by 1/(1-p); the mask is "
                   "counter_uniform(seed, stream, step) >= p",
               lowering={"expr": "dropout({0}, {1}, {idx}, {seed}, {stream}, {F}({p}))"},
               vjp=lambda ctx, g: [ctx.emit("dropout", g, ctx.inputs[1], rule="g * the same mask / (1 - p)",
                                            **ctx.attrs), None]))
