"""Elementwise ops: arithmetic with numpy broadcasting, comparisons, ``where``, activations,
casts and constants. Each op is one ``register`` call; the families share their shape rule."""

from __future__ import annotations

import math

import numpy as np

from ..graph import Value
from ..registry import Attr, OpDef, register
from ..types import DType, TensorType
from .common import FLOATS, NUMERIC, broadcast_shapes, require_dtype, same_dtype


def _binary_rule(allowed, result_dtype=None):
    def infer(a: TensorType, b: TensorType, *, _op) -> TensorType:
        dt = same_dtype(_op, a, b, allowed=allowed)
        return TensorType(result_dtype or dt, broadcast_shapes(_op, a, b))

    return infer


def _binary(name: str, fn, expr: str, allowed=NUMERIC, result_dtype=None, doc="", nondiff=None, vjp=None,
            gemm_update: str | None = None) -> OpDef:
    rule = _binary_rule(allowed, result_dtype)
    lowering = {"expr": expr} | ({"gemm_update": gemm_update} if gemm_update else {})
    return register(OpDef(name, "elementwise", lambda a, b: rule(a, b, _op=name),
                          lambda a, b: np.asarray(fn(a, b)), arity=2, doc=doc, nondiff=nondiff, vjp=vjp,
                          lowering=lowering))


def _unary(name: str, fn, expr: str, allowed=FLOATS, attrs=None, doc="", nondiff=None, result_dtype=None,
           vjp=None) -> OpDef:
    def infer(x: TensorType, **_attrs) -> TensorType:
        same_dtype(name, x, allowed=allowed)
        return TensorType(result_dtype or x.dtype, x.shape)

    def ref(x, **kw):
        return np.asarray(fn(x, **kw)).astype(result_dtype.np if result_dtype else x.dtype, copy=False)

    return register(OpDef(name, "elementwise", infer, ref, arity=1, attrs=attrs or {}, doc=doc,
                          nondiff=nondiff, vjp=vjp, lowering={"expr": expr}))


# ---- arithmetic --------------------------------------------------------------------------
# ``expr`` is the op's scalar lowering, shared by the CPU and CUDA backends: {0}, {1}, ... are the
# operands, {F} the constructor of the float type computed in (f32/f64), {OUT} of the result
# type, {name} an attribute; helper functions (fast_tanh, gelu_tanh, ...) are in codegen/scalar_lib.py.
# A VJP rule gets the context (the forward node, ``emit``) and the output's cotangent ``g``; it
# returns one gradient per input (None where ctx.wants(i) is false). ``rule=`` is the formula
# printed beside each backward node.
def _both(ctx, ga, gb):
    a, b = ctx.inputs
    return [ctx.unbroadcast(ga(), a.type, "lhs") if ctx.wants(0) else None,
            ctx.unbroadcast(gb(), b.type, "rhs") if ctx.wants(1) else None]


def _add_vjp(ctx, g):
    return _both(ctx, lambda: g, lambda: g)


def _sub_vjp(ctx, g):
    return _both(ctx, lambda: g, lambda: ctx.emit("neg", g, rule="-g", wrt="rhs"))


def _mul_vjp(ctx, g):
    a, b = ctx.inputs
    return _both(ctx, lambda: ctx.emit("mul", g, b, rule="g * b", wrt="lhs"),
                 lambda: ctx.emit("mul", g, a, rule="g * a", wrt="rhs"))


def _div_vjp(ctx, g):
    a, b = ctx.inputs
    y = ctx.outputs[0]

    def rhs():
        t = ctx.emit("div", ctx.emit("mul", g, y, rule="g * out", wrt="rhs"), b, rule="g * out / b", wrt="rhs")
        return ctx.emit("neg", t, rule="-g * a / b²", wrt="rhs")

    return _both(ctx, lambda: ctx.emit("div", g, b, rule="g / b", wrt="lhs"), rhs)


def _pow_vjp(ctx, g):
    a, b = ctx.inputs
    y = ctx.outputs[0]

    def lhs():
        b1 = ctx.emit("sub", b, ctx.const(1.0, b), rule="b - 1", wrt="lhs")
        da = ctx.emit("mul", b, ctx.emit("pow", a, b1, rule="a^(b-1)", wrt="lhs"), rule="b * a^(b-1)", wrt="lhs")
        return ctx.emit("mul", g, da, rule="g * b * a^(b-1)", wrt="lhs")

    def rhs():
        return ctx.emit("mul", g, ctx.emit("mul", y, ctx.emit("log", a, rule="log a", wrt="rhs"),
                                           rule="a^b * log a", wrt="rhs"), rule="g * a^b * log a", wrt="rhs")

    return _both(ctx, lhs, rhs)


def _select_vjp(cmp: str, doc: str):
    def vjp(ctx, g):
        a, b = ctx.inputs
        mask = ctx.emit(cmp, a, b, rule=doc, hint=f"{ctx.outputs[0].name}.mask")
        zero = ctx.const(0.0, g)
        return _both(ctx, lambda: ctx.emit("where", mask, g, zero, rule=f"g * [{doc}]", wrt="lhs"),
                     lambda: ctx.emit("where", mask, zero, g, rule=f"g * [not {doc}]", wrt="rhs"))

    return vjp


add = _binary("add", np.add, "({0} + {1})", doc="a + b", vjp=_add_vjp)
sub = _binary("sub", np.subtract, "({0} - {1})", doc="a - b", vjp=_sub_vjp, gemm_update="minus")
mul = _binary("mul", np.multiply, "({0} * {1})", doc="a * b", vjp=_mul_vjp, gemm_update="scale")
div = _binary("div", np.divide, "({0} / {1})", allowed=FLOATS, doc="a / b (floats)", vjp=_div_vjp)
pow = _binary("pow", np.power, "({0} ** {1})", allowed=FLOATS, doc="a ** b (floats)", vjp=_pow_vjp)
# NaN in either operand gives NaN, as in numpy (Python's max(a, b) keeps a when b is NaN)
maximum = _binary("maximum", np.maximum, "({0} if {0} > {1} or {0} != {0} else {1})",
                  doc="elementwise max; the gradient goes to a where a >= b",
                  vjp=_select_vjp("ge", "a >= b"))
minimum = _binary("minimum", np.minimum, "({0} if {0} < {1} or {0} != {0} else {1})",
                  doc="elementwise min; the gradient goes to a where a <= b",
                  vjp=_select_vjp("le", "a <= b"))

# ---- comparisons and logic (piecewise constant: no gradient) -----------------------------
_CMP = "a comparison is piecewise constant: its gradient is zero almost everywhere"
for _name, _fn, _sym in [("eq", np.equal, "=="), ("ne", np.not_equal, "!="), ("lt", np.less, "<"),
                         ("le", np.less_equal, "<="), ("gt", np.greater, ">"), ("ge", np.greater_equal, ">=")]:
    _binary(_name, _fn, f"({{0}} {_sym} {{1}})", result_dtype=DType.bool, doc=f"a {_sym} b -> bool", nondiff=_CMP)
_LOGIC = "boolean logic has no gradient"
_binary("logical_and", np.logical_and, "({0} and {1})", allowed=(DType.bool,), doc="a and b", nondiff=_LOGIC)
_binary("logical_or", np.logical_or, "({0} or {1})", allowed=(DType.bool,), doc="a or b", nondiff=_LOGIC)
_unary("logical_not", np.logical_not, "(not {0})", allowed=(DType.bool,), doc="not a", nondiff=_LOGIC)


def _where_infer(c: TensorType, a: TensorType, b: TensorType) -> TensorType:
    require_dtype("where", "the condition", c, (DType.bool,))
    dt = same_dtype("where", a, b)
    return TensorType(dt, broadcast_shapes("where", c, a, b))


def _where_vjp(ctx, g):
    c, a, b = ctx.inputs
    zero = ctx.const(0.0, g)
    return [None,
            ctx.unbroadcast(ctx.emit("where", c, g, zero, rule="g where cond", wrt="a"), a.type, "a")
            if ctx.wants(1) else None,
            ctx.unbroadcast(ctx.emit("where", c, zero, g, rule="g where not cond", wrt="b"), b.type, "b")
            if ctx.wants(2) else None]


register(OpDef("where", "elementwise", _where_infer, lambda c, a, b: np.where(c, a, b), arity=3,
               doc="cond ? a : b, with broadcasting", vjp=_where_vjp, lowering={"expr": "({1} if {0} else {2})"}))

# ---- unary math and activations ----------------------------------------------------------
def _scale(ctx, g, factor: Value, rule: str) -> list:
    return [ctx.emit("mul", g, factor, rule=rule)]


def _neg_vjp(ctx, g):
    return [ctx.emit("neg", g, rule="-g")]


def _abs_vjp(ctx, g):
    (x,) = ctx.inputs
    mask = ctx.emit("ge", x, ctx.const(0.0, x), rule="x >= 0", hint=f"{ctx.outputs[0].name}.mask")
    return [ctx.emit("where", mask, g, ctx.emit("neg", g, rule="-g"), rule="g * sign(x)")]


def _exp_vjp(ctx, g):
    return _scale(ctx, g, ctx.outputs[0], "g * exp(x)")


def _log_vjp(ctx, g):
    return [ctx.emit("div", g, ctx.inputs[0], rule="g / x")]


def _sqrt_vjp(ctx, g):
    (y,) = ctx.outputs
    half_g = ctx.emit("mul", g, ctx.const(0.5, g), rule="g / 2")
    return [ctx.emit("div", half_g, y, rule="g / (2 sqrt(x))")]


def _rsqrt_vjp(ctx, g):
    (y,) = ctx.outputs
    y3 = ctx.emit("mul", y, ctx.emit("mul", y, y, rule="out²"), rule="out³ = x^(-3/2)")
    return [ctx.emit("mul", g, ctx.emit("mul", y3, ctx.const(-0.5, y), rule="-x^(-3/2) / 2"),
                     rule="g * -x^(-3/2) / 2")]


def _tanh_vjp(ctx, g):
    (y,) = ctx.outputs
    d = ctx.emit("sub", ctx.const(1.0, y), ctx.emit("mul", y, y, rule="tanh²"), rule="1 - tanh²")
    return _scale(ctx, g, d, "g * (1 - tanh²(x))")


def _erf_vjp(ctx, g):
    (x,) = ctx.inputs
    sq = ctx.emit("mul", x, x, rule="x²")
    e = ctx.emit("exp", ctx.emit("neg", sq, rule="-x²"), rule="exp(-x²)")
    return _scale(ctx, g, ctx.emit("mul", e, ctx.const(2.0 / math.sqrt(math.pi), x), rule="2/sqrt(pi) exp(-x²)"),
                  "g * 2/sqrt(pi) exp(-x²)")


def _sigmoid_vjp(ctx, g):
    (y,) = ctx.outputs
    d = ctx.emit("mul", y, ctx.emit("sub", ctx.const(1.0, y), y, rule="1 - σ"), rule="σ(1 - σ)")
    return _scale(ctx, g, d, "g * σ(x)(1 - σ(x))")


def _relu_vjp(ctx, g):
    (x,) = ctx.inputs
    mask = ctx.emit("gt", x, ctx.const(0.0, x), rule="x > 0", hint=f"{ctx.outputs[0].name}.mask")
    return [ctx.emit("where", mask, g, ctx.const(0.0, g), rule="g * (x > 0)")]


def _leaky_relu_vjp(ctx, g):
    (x,) = ctx.inputs
    alpha = ctx.attrs["alpha"]
    mask = ctx.emit("gt", x, ctx.const(0.0, x), rule="x > 0", hint=f"{ctx.outputs[0].name}.mask")
    small = ctx.emit("mul", g, ctx.const(alpha, g), rule=f"{alpha} g")
    return [ctx.emit("where", mask, g, small, rule=f"g if x > 0 else {alpha} g")]


_unary("neg", np.negative, "(-{0})", allowed=NUMERIC, doc="-x", vjp=_neg_vjp)
_unary("abs", np.abs, "abs({0})", allowed=NUMERIC, doc="|x|", vjp=_abs_vjp)
_unary("exp", np.exp, "fast_exp({0})", doc="e^x", vjp=_exp_vjp)
_unary("log", np.log, "math.log({0})", doc="natural logarithm", vjp=_log_vjp)
_unary("sqrt", np.sqrt, "math.sqrt({0})", doc="square root", vjp=_sqrt_vjp)
# 1 / sqrt(x) under fast-math 'arcp' becomes LLVM's rsqrt estimate and a Newton step: NaN at ±0 and
# inf (inf * 0), -inf at denormals (scalar rsqrtss reads them as 0). abs() hides the sqrt from that
# rewrite (a true division, ~2x the time, correctly rounded); ±0 gives ±inf as numpy does.
_unary("rsqrt", lambda x: 1.0 / np.sqrt(x),
       "({F}(1.0) / abs(math.sqrt({0})) if {0} != {F}(0.0) else {F}(1.0) / {0})",
       doc="1 / sqrt(x)", vjp=_rsqrt_vjp)
_unary("tanh", np.tanh, "fast_tanh({0})", doc="hyperbolic tangent", vjp=_tanh_vjp)
def _erf(x):
    from scipy import special  # here, not at import: scipy.special takes ~0.15 s to import

    return special.erf(x)


def _expit(x):
    from scipy import special

    return special.expit(x)


_unary("erf", _erf, "math.erf({0})", doc="error function", vjp=_erf_vjp)
_unary("sigmoid", _expit, "sigmoid({0})", doc="1 / (1 + e^-x)", vjp=_sigmoid_vjp)
_unary("relu", lambda x: np.maximum(x, 0), "({F}(0.0) if {0} < {F}(0.0) else {0})", doc="max(x, 0)", vjp=_relu_vjp)
_unary("leaky_relu", lambda x, alpha: np.where(x > 0, x, alpha * x), "({0} if {0} > {F}(0.0) else {F}({alpha}) * {0})",
       attrs={"alpha": Attr("float", 0.01)}, doc="x if x > 0 else alpha * x", vjp=_leaky_relu_vjp)

GELU_TANH_C = math.sqrt(2.0 / math.pi)


def gelu_ref(x, approximate: str):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(GELU_TANH_C * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_infer(x: TensorType, approximate: str) -> TensorType:
    from gradfuse.errors import ShapeError

    if approximate not in ("none", "tanh"):
        raise ShapeError(f'gelu: approximate must be "none" (erf form) or "tanh", got "{approximate}"')
    same_dtype("gelu", x, allowed=FLOATS)
    return x


def gelu_grad_ref(x, g, approximate: str):
    """d gelu / dx * g, for both forms."""
    if approximate == "tanh":
        inner = GELU_TANH_C * (x + 0.044715 * x**3)
        t = np.tanh(inner)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_TANH_C * (1.0 + 3 * 0.044715 * x * x)
    else:
        d = 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return (g * d).astype(x.dtype, copy=False)


def _gelu_vjp(ctx, g):
    (x,) = ctx.inputs
    rule = "g * (Φ(x) + x φ(x))" if ctx.attrs["approximate"] == "none" else "g * d/dx[tanh-approximated gelu]"
    return [ctx.emit("gelu_grad", x, g, rule=rule, approximate=ctx.attrs["approximate"])]


_GELU_ATTRS = {"approximate": Attr("str", "none", "'none' (erf) or 'tanh'")}
register(OpDef("gelu", "elementwise", _gelu_infer,
               lambda x, approximate: gelu_ref(x, approximate).astype(x.dtype, copy=False),
               arity=1, attrs=_GELU_ATTRS, doc="x * Phi(x), exact (erf) or tanh approximation", vjp=_gelu_vjp,
               lowering={"expr": "gelu_{approximate}({0})"}))


def _gelu_grad_infer(x: TensorType, g: TensorType, approximate: str) -> TensorType:
    _gelu_infer(x, approximate)
    same_dtype("gelu_grad", x, g, allowed=FLOATS)
    if x.shape != g.shape:
        from gradfuse.errors import ShapeError

        raise ShapeError(f"gelu_grad: x {x} and g {g} differ in shape")
    return x


register(OpDef("gelu_grad", "elementwise", _gelu_grad_infer, gelu_grad_ref, arity=2, attrs=_GELU_ATTRS,
               doc="g * gelu'(x): the backward of gelu as one elementwise op",
               lowering={"expr": "gelu_grad_{approximate}({0}, {1})"},
               nondiff="a backward op: gradients of gradients are not supported"))


# ---- casts and constants -----------------------------------------------------------------
def _cast_infer(x: TensorType, dtype: DType) -> TensorType:
    return x.with_dtype(dtype)


def _cast_vjp(ctx, g):
    (x,) = ctx.inputs
    return [ctx.emit("cast", g, rule=f"g as {x.type.dtype}", dtype=x.type.dtype) if x.type.dtype.is_float else None]


register(OpDef("cast", "elementwise", _cast_infer, lambda x, dtype: x.astype(dtype.np), arity=1,
               attrs={"dtype": Attr("dtype")}, doc="convert to another dtype", vjp=_cast_vjp,
               lowering={"expr": "{OUT}({0})"}))


def _const_infer(*, value: float, dtype: DType, shape) -> TensorType:
    return TensorType(dtype, shape)


def _const_ref(*, value: float, dtype: DType, shape):
    assert all(isinstance(d, int) for d in shape), "const ref needs concrete dims (see interpreter)"
    return np.full(shape, value, dtype=dtype.np)


register(OpDef("const", "source", _const_infer, _const_ref, arity=0,
               attrs={"value": Attr("float"), "dtype": Attr("dtype", DType.f32), "shape": Attr("dims", ())},
               doc="a tensor filled with one value", nondiff="a constant has no inputs",
               lowering={"expr": "{OUT}({value})", "immediate": "value"}, immediate_scalar=True))
