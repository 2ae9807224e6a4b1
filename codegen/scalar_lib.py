"""Scalar helper functions used by the ops' lowering templates (``fast_tanh``, ``gelu_tanh``, ...).

Written once, for every backend and float type: a backend copies the source of the helpers a
program uses into the generated module, with ``F`` replaced by the float type's constructor
(``f32``/``f64``) and each helper's name suffixed by it (``fast_tanh_f32``), under its own
decorator (``@njit`` on the CPU, ``@cuda.jit(device=True)`` for CUDA). Typed literals matter:
Numba computes ``0.5 * x`` in float64 even when ``x`` is float32.

The helpers use ``math.*`` and two primitives whose best form differs by backend (PRIMITIVES):
``floor_f`` (``np.floor`` keeps a CPU loop vectorised; CUDA compiles ``math.floor``) and
``ldexp_f(x, n)`` = x·2^n (the CPU builds 2^n from exponent bits, which vectorises and flushes
results below 2^-126 to 0; CUDA calls ``math.ldexp``). Never ``numba.cuda.libdevice``: the
simulator returns NaN from it silently.
"""

from __future__ import annotations

import inspect
import math  # noqa: F401  (used by the helpers' source)
import re

import numpy as np  # noqa: F401  (used by the helpers' source)

F = float  # the float type's constructor; the backends substitute f32 or f64 (and Python runs them as is)


def fast_tanh(x):
    """Eigen's rational approximation (float32 error ~1e-7 absolute), clamped at ±7.9053: a
    polynomial in x over a polynomial in x², which vectorises, unlike a call to libm's tanh.
    Exactly ±1 beyond |x| = 9, where float32 tanh rounds to 1: the approximation stops 2 ulps
    short, which 1 + tanh(x) (gelu, sigmoid at large negative x) would turn into |x| * 2.4e-7."""
    c = min(max(x, F(-7.90531110763549805)), F(7.90531110763549805))
    c2 = c * c
    p = c2 * F(-2.76076847742355e-16) + F(2.00018790482477e-13)
    p = p * c2 + F(-8.60467152213735e-11)
    p = p * c2 + F(5.12229709037114e-08)
    p = p * c2 + F(1.48572235717979e-05)
    p = p * c2 + F(6.37261928875436e-04)
    p = p * c2 + F(4.89352455891786e-03)
    q = c2 * F(1.19825839466702e-06) + F(1.18534705686654e-04)
    q = q * c2 + F(2.26843463243900e-03)
    q = q * c2 + F(4.89352518554385e-03)
    t = c * p / q
    return (F(1.0) if x > F(0.0) else F(-1.0)) if abs(x) >= F(9.0) else t  # NaN stays NaN


def fast_exp(x):
    """e^x as 2^n · e^r (Cephes' expf): n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts),
    e^r by a degree-7 polynomial, 2^n from its exponent bits; vectorises, unlike libm's expf (a
    4096x1024 softmax: 2.9 ms against 12.2). Measured within 4.5 ulp (mean 1.2) of e^x over
    [-86, 88.7]; inf above 88.72; results below 2^-125 (x < -87) flush to 0; NaN stays NaN."""
    c = min(max(x, F(-87.33654475)), F(88.72283935))
    n = floor_f(c * F(1.4426950408889634) + F(0.5))
    r = c - n * F(0.693359375) - n * F(-2.12194440e-4)
    p = F(1.9875691500e-4) * r + F(1.3981999507e-3)
    p = p * r + F(8.3334519073e-3)
    p = p * r + F(4.1665795894e-2)
    p = p * r + F(1.6666665459e-1)
    p = p * r + F(5.0000001201e-1)
    p = p * r * r + r + F(1.0)
    y = ldexp_f(p * F(2.0), n - F(1.0))  # 2^(n-1): no overflow at n = 128
    return y if x == x else x


def sigmoid(x):
    """1 / (1 + e^-x): relative accuracy kept where σ is tiny (x << 0), 0 and 1 at the ends."""
    return F(1.0) / (F(1.0) + fast_exp(-x))


def gelu_tanh(x):
    """x (1 + tanh u) / 2 = x / (1 + e^(-2u)), u = √(2/π)(x + 0.044715 x³), with fast_exp's
    method inlined and trimmed for this use: -2u clamped to [-87, 88] (2^n needs no second
    scaling step), one-part ln 2, and e^r to degree 5 (a near-minimax fit, 1.8e-7 relative on
    |r| <= ln2/2). Within 1.8e-6 relative wherever |gelu| > 1e-6 (the rational tanh lost all
    relative accuracy at x << 0: 0.44); in the fused GELU+LayerNorm row kernel, 4096x1024: 1.37
    ms, against 1.61 with fast_exp's degree-7 polynomial and 1.70 through the rational tanh.
    One select: NaN at x = -inf, as the formula gives there (-inf · 0) in numpy and in every
    other gelu helper, where the clamp alone made it -inf / e^88 (+4% on a gelu-only loop)."""
    z = min(max(F(-1.5957691216057308) * (x + F(0.044715) * x * x * x), F(-87.0)), F(88.0))
    n = floor_f(z * F(1.4426950408889634) + F(0.5))
    r = z - n * F(0.6931471805599453)
    p = F(0.008346440270543098) * r + F(0.04192711040377617)
    p = p * r + F(0.16666781902313232)
    p = p * r + F(0.4999886155128479)
    p = p * r * r + r + F(1.0)
    return x / (F(1.0) + ldexp_f(p, n)) if x > F(-np.inf) else F(np.nan)  # at -inf and NaN (not x - x:
    # reassociation cancels it to 0 once x is itself a difference, as in gelu(c - y))


def one_plus_erf(x):
    """1 + erf(x) = erfc(-x), relatively accurate where it is tiny (x << 0, the left tail of the
    exact GELU), without libm's scalar erf: erfc(a) = P(t) e^(-a²) for a >= 0, t = 1 / (1 + a/2),
    P of degree 10 fitted here to erfc(a) e^(a²) on [0, 12] (relative least squares: 5e-8 in
    float64 arithmetic; evaluated in float32, 4e-6 relative against scipy's erfc on [0, 9.2]).
    The exponential is fast_exp's, so the loop vectorises. float64 uses libm's erfc instead."""
    a = abs(x)
    t = F(1.0) / (F(1.0) + F(0.5) * a)
    p = F(0.017980985078697092) * t + F(-0.15678804990557685)
    p = p * t + F(0.5147573076991484)
    p = p * t + F(-0.7954979869456922)
    p = p * t + F(0.5369915633840783)
    p = p * t + F(-0.1684697090013134)
    p = p * t + F(0.2537805050891738)
    p = p * t + F(0.23120922698991678)
    p = p * t + F(0.28408062011507157)
    p = p * t + F(0.2819509745751214)
    p = p * t + F(4.510044191569439e-06)
    e = p * fast_exp(-(a * a))  # erfc(|x|)
    return F(2.0) - e if x >= F(0.0) else e if x < F(0.0) else x  # NaN stays NaN


def gelu_none(x):
    """The exact GELU, x Φ(x) = x (1 + erf(x / √2)) / 2."""
    return F(0.5) * x * one_plus_erf(x * F(0.7071067811865476))


def gelu_grad_tanh(x, g):
    t = fast_tanh(F(0.7978845608028654) * (x + F(0.044715) * x * x * x))
    d = F(0.5) * (F(1.0) + t) + F(0.5) * x * (F(1.0) - t * t) * F(0.7978845608028654) * (F(1.0) + F(0.134145) * x * x)
    return g * d


def gelu_grad_none(x, g):
    d = F(0.5) * one_plus_erf(x * F(0.7071067811865476)) + x * fast_exp(F(-0.5) * x * x) * F(0.3989422804014327)
    return g * d


def hash32(x):
    """Wellons' lowbias32 in int64 arithmetic masked to 32 bits (the same bits on every backend as
    the numpy reference in ir/ops/random.py)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def counter_uniform(seed, stream, step, index):
    key = hash32((seed & 0xFFFFFFFF) ^ hash32((stream * 0x9E3779B9 + step) & 0xFFFFFFFF))
    bits = hash32((index & 0xFFFFFFFF) ^ key)
    return F(bits >> 8) * F(5.960464477539063e-08)  # 24 bits times 2^-24: exact in float32 too


def dropout(x, step, index, seed, stream, p):
    if counter_uniform(seed, stream, step, index) >= p:
        return x / (F(1.0) - p)
    return F(0.0)


def tanh_exact(x):
    """float64 keeps libm's tanh: the rational approximation's ~1e-7 would cost nine digits."""
    return math.tanh(x)


def gelu_tanh_exact(x):
    """float64 computes the formula with libm's tanh."""
    return F(0.5) * x * (F(1.0) + math.tanh(F(0.7978845608028654) * (x + F(0.044715) * x * x * x)))


def one_plus_erf_exact(x):
    """float64 keeps libm's erfc (1 + erf(x) = erfc(-x): no cancellation at x << 0)."""
    return math.erfc(-x)


def exp_exact(x):
    """float64 keeps libm's exp (the polynomial above is for float32)."""
    return math.exp(x)


def floor_f(x):
    """floor(x), as a float."""
    return np.floor(x)


def ldexp_f(x, n):
    """x·2^n for an integer-valued float n in [-126, 127], from 2^n's exponent bits (float32)."""
    return x * np.int32((np.int32(n) + np.int32(127)) << 23).view(np.float32)


def ldexp_f_cuda(x, n):
    return math.ldexp(x, i32(n))


def floor_f_cuda(x):
    return math.floor(x)


# backend -> {primitive: its function there}; the functions above are the CPU's (and Python's)
PRIMITIVES = {"cpu": {"floor_f": floor_f, "ldexp_f": ldexp_f},
              "cuda": {"floor_f": floor_f_cuda, "ldexp_f": ldexp_f_cuda}}
BACKENDS = tuple(PRIMITIVES)

# (helper, float type) -> the function used instead of the generic helper for that type
SPECIAL = {("fast_tanh", "f64"): tanh_exact, ("fast_exp", "f64"): exp_exact, ("gelu_tanh", "f64"): gelu_tanh_exact,
           ("one_plus_erf", "f64"): one_plus_erf_exact}

HELPERS = {f.__name__: f for f in (floor_f, ldexp_f, fast_tanh, fast_exp, sigmoid, gelu_tanh, one_plus_erf, gelu_none,
                                   gelu_grad_tanh, gelu_grad_none, hash32, counter_uniform, dropout)}
_CALL = re.compile(r"\b(" + "|".join(HELPERS) + r")\(")
i32 = np.int32  # as the generated modules define it


def specialise(expr: str, ftype: str) -> str:
    """``fast_tanh(x)`` -> ``fast_tanh_f32(x)`` in an expression computed in ``ftype``."""
    return _CALL.sub(lambda m: f"{m.group(1)}_{ftype}(", expr)


def helpers_used(code: str, backend: str = "cpu") -> set[tuple[str, str]]:
    """(helper, float type) pairs called in generated ``code``, including what they call."""
    found = set(re.findall(r"\b(" + "|".join(HELPERS) + r")_(f32|f64)\(", code))
    todo = list(found)
    while todo:
        name, ftype = todo.pop()
        for callee in _CALL.findall(_body(name, ftype, backend)):
            if (callee, ftype) not in found:
                found.add((callee, ftype))
                todo.append((callee, ftype))
    return found


def _function(name: str, ftype: str, backend: str):
    return PRIMITIVES[backend].get(name) or SPECIAL.get((name, ftype), HELPERS[name])


def _body(name: str, ftype: str, backend: str = "cpu") -> str:
    return inspect.getsource(_function(name, ftype, backend))


def helper_source(name: str, ftype: str, decorator: str, backend: str = "cpu") -> str:
    """The helper's source for one float type and backend, under ``decorator``."""
    fn = _function(name, ftype, backend)
    src = specialise(inspect.getsource(fn), ftype)
    src = re.sub(rf"^def {fn.__name__}\(", f"def {name}_{ftype}(", src, flags=re.M)
    src = re.sub(r"\bF\(", f"{ftype}(", src)
    return f"{decorator}\n{src}"


def ordered_helpers(used: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """Callees before callers, so each definition exists when the next one is compiled."""
    order = list(HELPERS)
    return sorted(used, key=lambda item: (order.index(item[0]), item[1]))
