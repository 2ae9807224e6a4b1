"""Elementwise ops: arithmetic with numpy broadcasting, comparisons, ``where``, activations,
casts and constants. Each op is one ``register`` call; the families share their shape rule."""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from ..registry import Attr, OpDef, register
from ..types import DType, TensorType
from .common import FLOATS, NUMERIC, broadcast_shapes, same_dtype


def _binary_rule(allowed, result_dtype=None):
    def infer(a: TensorType, b: TensorType, *, _op) -> TensorType:
        dt = same_dtype(_op, a, b, allowed=allowed)
        return TensorType(result_dtype or dt, broadcast_shapes(_op, a, b))

    return infer


def _binary(name: str, fn, allowed=NUMERIC, result_dtype=None, doc="", nondiff=None) -> OpDef:
    rule = _binary_rule(allowed, result_dtype)
    return register(OpDef(name, "elementwise", lambda a, b: rule(a, b, _op=name),
                          lambda a, b: np.asarray(fn(a, b)), arity=2, doc=doc, nondiff=nondiff))


def _unary(name: str, fn, allowed=FLOATS, attrs=None, doc="", nondiff=None, result_dtype=None) -> OpDef:
    def infer(x: TensorType, **_attrs) -> TensorType:
        same_dtype(name, x, allowed=allowed)
        return TensorType(result_dtype or x.dtype, x.shape)

    def ref(x, **kw):
        return np.asarray(fn(x, **kw)).astype(result_dtype.np if result_dtype else x.dtype, copy=False)

    return register(OpDef(name, "elementwise", infer, ref, arity=1, attrs=attrs or {}, doc=doc,
                          nondiff=nondiff))


# ---- arithmetic --------------------------------------------------------------------------
add = _binary("add", np.add, doc="a + b")
sub = _binary("sub", np.subtract, doc="a - b")
mul = _binary("mul", np.multiply, doc="a * b")
div = _binary("div", np.divide, allowed=FLOATS, doc="a / b (floats)")
pow = _binary("pow", np.power, allowed=FLOATS, doc="a ** b (floats)")
maximum = _binary("maximum", np.maximum, doc="elementwise max; the gradient goes to a where a >= b")
minimum = _binary("minimum", np.minimum, doc="elementwise min; the gradient goes to a where a <= b")

# ---- comparisons and logic (piecewise constant: no gradient) -----------------------------
_CMP = "a comparison is piecewise constant: its gradient is zero almost everywhere"
for _name, _fn in [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
                   ("gt", np.greater), ("ge", np.greater_equal)]:
    _binary(_name, _fn, result_dtype=DType.bool, doc=f"a {_name} b -> bool", nondiff=_CMP)
_LOGIC = "boolean logic has no gradient"
_binary("logical_and", np.logical_and, allowed=(DType.bool,), doc="a and b", nondiff=_LOGIC)
_binary("logical_or", np.logical_or, allowed=(DType.bool,), doc="a or b", nondiff=_LOGIC)
_unary("logical_not", np.logical_not, allowed=(DType.bool,), doc="not a", nondiff=_LOGIC)


def _where_infer(c: TensorType, a: TensorType, b: TensorType) -> TensorType:
    same_dtype("where", c, allowed=(DType.bool,))
    dt = same_dtype("where", a, b)
    return TensorType(dt, broadcast_shapes("where", c, a, b))


register(OpDef("where", "elementwise", _where_infer, lambda c, a, b: np.where(c, a, b), arity=3,
               doc="cond ? a : b, with broadcasting"))

# ---- unary math and activations ----------------------------------------------------------
_unary("neg", np.negative, allowed=NUMERIC, doc="-x")
_unary("abs", np.abs, allowed=NUMERIC, doc="|x|")
_unary("exp", np.exp, doc="e^x")
_unary("log", np.log, doc="natural logarithm")
_unary("sqrt", np.sqrt, doc="square root")
_unary("rsqrt", lambda x: 1.0 / np.sqrt(x), doc="1 / sqrt(x)")
_unary("tanh", np.tanh, doc="hyperbolic tangent")
_unary("erf", special.erf, doc="error function")
_unary("sigmoid", special.expit, doc="1 / (1 + e^-x)")
_unary("relu", lambda x: np.maximum(x, 0), doc="max(x, 0)")
_unary("leaky_relu", lambda x, alpha: np.where(x > 0, x, alpha * x),
       attrs={"alpha": Attr("float", 0.01)}, doc="x if x > 0 else alpha * x")

GELU_TANH_C = math.sqrt(2.0 / math.pi)


def gelu_ref(x, approximate: str):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(GELU_TANH_C * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


def _gelu_infer(x: TensorType, approximate: str) -> TensorType:
    from gradfuse.errors import ShapeError

    if approximate not in ("none", "tanh"):
        raise ShapeError(f'gelu: approximate must be "none" (erf form) or "tanh", got "{approximate}"')
    same_dtype("gelu", x, allowed=FLOATS)
    return x


register(OpDef("gelu", "elementwise", _gelu_infer,
               lambda x, approximate: gelu_ref(x, approximate).astype(x.dtype, copy=False),
               arity=1, attrs={"approximate": Attr("str", "none", "'none' (erf) or 'tanh'")},
               doc="x * Phi(x), exact (erf) or tanh approximation"))


# ---- casts and constants -----------------------------------------------------------------
def _cast_infer(x: TensorType, dtype: DType) -> TensorType:
    return x.with_dtype(dtype)


register(OpDef("cast", "elementwise", _cast_infer, lambda x, dtype: x.astype(dtype.np), arity=1,
               attrs={"dtype": Attr("dtype")}, doc="convert to another dtype",
               nondiff=None))


def _const_infer(*, value: float, dtype: DType, shape) -> TensorType:
    return TensorType(dtype, shape)


def _const_ref(*, value: float, dtype: DType, shape):
    assert all(isinstance(d, int) for d in shape), "const ref needs concrete dims (see interpreter)"
    return np.full(shape, value, dtype=dtype.np)


register(OpDef("const", "source", _const_infer, _const_ref, arity=0,
               attrs={"value": Attr("float"), "dtype": Attr("dtype", DType.f32), "shape": Attr("dims", ())},
               doc="a tensor filled with one value", nondiff="a constant has no inputs"))
