"""Composite neural-network ops kept whole in the IR: softmax, losses, normalisations, embedding.

They stay single ops so that their closed-form gradients (softmax + cross-entropy: ``p - y``)
and their fused row-reduction kernels remain visible; a pass may decompose them.
"""

from __future__ import annotations

import numpy as np

from gradfuse.errors import InputError, ShapeError

from ..registry import Attr, IndexCheck, OpDef, RowProgram, RowsCheck, RowStat, register
from ..types import DType, TensorType
from .common import FLOATS, check_axis, require_dtype, require_rank, same_dtype

INTS = (DType.i32, DType.i64)


# ---- softmax family ----------------------------------------------------------------------
def _softmax_infer(name):
    def infer(x: TensorType, *, axis: int) -> TensorType:
        same_dtype(name, x, allowed=FLOATS)
        check_axis(name, x, axis)
        return x

    return infer


def log_softmax_ref(x, axis: int):
    # initial=-inf: np.max has no identity without it, and raises on a tensor with no rows (an
    # empty axis elsewhere, from a slice [0:0]); the kernels' max starts from -inf too
    shifted = x - x.max(axis=axis, keepdims=True, initial=-np.inf)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _softmax_vjp(ctx, g):
    (y,) = ctx.outputs
    axis = ctx.attrs["axis"]
    gy = ctx.emit("mul", g, y, rule="g * y")
    dot = ctx.emit("sum", gy, rule="Σ g * y along the row", axes=[axis], keepdims=True)
    return [ctx.emit("mul", y, ctx.emit("sub", g, dot, rule="g - Σ g y"), rule="y * (g - Σ g y)")]


def _log_softmax_vjp(ctx, g):
    (y,) = ctx.outputs
    axis = ctx.attrs["axis"]
    total = ctx.emit("sum", g, rule="Σ g along the row", axes=[axis], keepdims=True)
    p = ctx.emit("exp", y, rule="softmax(x) = exp(log_softmax(x))")
    return [ctx.emit("sub", g, ctx.emit("mul", p, total, rule="softmax(x) Σ g"), rule="g - softmax(x) Σ g")]


def _attr_axis(node) -> int:
    return node.attrs["axis"]


_MAX = RowStat("max", "max", "{x}")
_SUMEXP = RowStat("sumexp", "sum", "fast_exp_{F}({x} - {max})")
_SOFTMAX_ROWS = RowProgram((_MAX, _SUMEXP), lets=(("inv", "{F}(1.0) / {sumexp}"),),
                           out="fast_exp_{F}({x} - {max}) * {inv}")
_LOG_SOFTMAX_ROWS = RowProgram((_MAX, _SUMEXP), lets=(("lse", "{max} + math.log({sumexp})"),), out="{x} - {lse}")


register(OpDef("softmax", "structured", _softmax_infer("softmax"),
               lambda x, *, axis: np.exp(log_softmax_ref(x, axis)).astype(x.dtype), arity=1,
               attrs={"axis": Attr("int")}, doc="exp(x) / sum(exp(x)) along axis", vjp=_softmax_vjp,
               role="row", lowering={"row": _SOFTMAX_ROWS, "row_axis": _attr_axis}))
register(OpDef("log_softmax", "structured", _softmax_infer("log_softmax"),
               lambda x, *, axis: log_softmax_ref(x, axis).astype(x.dtype), arity=1,
               attrs={"axis": Attr("int")}, doc="x - logsumexp(x) along axis", vjp=_log_softmax_vjp,
               role="row", lowering={"row": _LOG_SOFTMAX_ROWS, "row_axis": _attr_axis}))


# ---- losses (mean over every example) ----------------------------------------------------
def _xent_infer(logits: TensorType, labels: TensorType) -> TensorType:
    require_rank("softmax_cross_entropy", "logits", logits, tuple(range(1, 9)), hint="logits need a class axis")
    same_dtype("softmax_cross_entropy", logits, allowed=FLOATS)
    require_dtype("softmax_cross_entropy", "labels", labels, INTS)
    if labels.shape != logits.shape[:-1]:
        raise ShapeError(f"softmax_cross_entropy: labels {labels} do not match logits {logits} "
                         f"(expected labels of shape [{','.join(map(str, logits.shape[:-1]))}])",
                         hint="labels are class indices, one per row of logits, not one-hot vectors")
    return TensorType(logits.dtype, ())


def check_indices(op: str, what: str, ids, size: int) -> None:
    """Integer inputs index a table: refuse out-of-range ones instead of wrapping or crashing."""
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise InputError(f"{op}: {what} must lie in [0, {size}), got min {ids.min()}, max {ids.max()}")


def xent_ref(logits, labels):
    """Per row (m - x[label]) + log1p(Σ_j e^(x_j - m) - 1), m the row's max, with the sum minus 1
    taken as (ties - 1) + Σ over the x_j below m: a confident row's tiny loss is then never
    rounded at the size of m or of 1 (``-log_softmax[label]`` was: relative error 1e-3 at a loss
    of 1e-6, 0.3 at 1e-7, in float32). The CPU row kernel computes the same way."""
    check_indices("softmax_cross_entropy", "labels", labels, logits.shape[-1])
    dt = logits.dtype
    m = logits.max(axis=-1, keepdims=True)
    d = logits - m
    top = d >= 0  # the maximal elements (NaN is not: it goes into the sum and on into the loss)
    below = np.where(top, dt.type(0), np.exp(d)).sum(axis=-1)
    picked = np.take_along_axis(logits, labels[..., None].astype(np.int64), axis=-1)
    rows = (m - picked)[..., 0] + np.log1p((top.sum(axis=-1) - 1).astype(dt) + below)
    return np.asarray(rows.mean(), dtype=dt)


_BACKWARD_OP = "a backward op: gradients of gradients are not supported"


def _scalar_cotangent(op: str, g: TensorType, like: TensorType) -> None:
    if g.shape != () or g.dtype != like.dtype:
        raise ShapeError(f"{op}: the incoming gradient must be a {like.dtype}[] scalar, got {g}")


def _xent_grad_infer(logits, labels, g):
    _xent_infer(logits, labels)
    _scalar_cotangent("softmax_cross_entropy_grad", g, logits)
    return logits


def xent_grad_ref(logits, labels, g):
    check_indices("softmax_cross_entropy_grad", "labels", labels, logits.shape[-1])
    p = np.exp(log_softmax_ref(logits, -1))
    np.put_along_axis(p, labels[..., None].astype(np.int64), np.take_along_axis(
        p, labels[..., None].astype(np.int64), axis=-1) - 1, axis=-1)
    return (p * (g / max(labels.size, 1))).astype(logits.dtype)


# -log softmax(x)[label] = (m - x[label]) + log1p(sumexp - 1), as xent_ref: a confident row's small
# loss is never rounded at the size of m or of 1. sumexp - 1 is ``more + below``: how many x_j
# beyond one equal the max m, and the e^(x_j - m) of the others (a NaN lands there) - products,
# not branches, so that the loop vectorises (a conditional add ran 5x slower), and not
# e - [d == 0], which reassociation turns into Σe - Σ[d == 0] (1 + tiny - 1). ``abs`` of m - x[label]
# (>= 0 anyway) is an intrinsic fastmath's reassociation does not see through: without it LLVM
# summed ``acc + m - x[label] + ...`` in an order that rounds at m again (6e-2 relative).
_XENT_ROWS = RowProgram(
    (_MAX, RowStat("more", "sum", "{F}({x} - {max} == {F}(0.0))", finish="{acc} - {F}(1.0)"),
     RowStat("below", "sum", "fast_exp_{F}({x} - {max}) * {F}({x} - {max} != {F}(0.0))")),
    lets=(("label", "{in1}"),), out="abs({max} - {x@label}) + math.log1p({more} + {below})", result="scalar",
    provides=(("sumexp", "({more} + {F}(1.0)) + {below}"),))
# the label's (p - 1) g / R as one product, as xent_grad_ref: p g/R - g/R is inf - inf (NaN) for an
# infinite g; p at the label is read before the result loop, which may overwrite the row in place
_XENT_GRAD_ROWS = RowProgram(
    (_MAX, _SUMEXP),
    lets=(("label", "{in1}"), ("scale", "{in2} / ({F}({R}) * {sumexp})"), ("hit", "{in2} / {F}({R})"),
          ("p_label", "fast_exp_{F}({x@label} - {max}) / {sumexp}")),
    out="(({p_label} - {F}(1.0)) * {hit} if {j} == {label} else fast_exp_{F}({x} - {max}) * {scale})")

_LABELS = IndexCheck(1, lambda node: node.inputs[0].type.shape[-1], "labels")  # class indices into the logits
register(OpDef("softmax_cross_entropy", "structured", _xent_infer, xent_ref, arity=2,
               doc="mean over rows of -log softmax(logits)[label]; labels are integer classes",
               vjp=lambda ctx, g: [ctx.emit("softmax_cross_entropy_grad", *ctx.inputs, g,
                                            rule="(softmax(z) - onehot(y)) / n"), None],
               role="row", lowering={"row": _XENT_ROWS},
               checks=(_LABELS,)))
register(OpDef("softmax_cross_entropy_grad", "structured", _xent_grad_infer, xent_grad_ref, arity=3,
               doc="g * (softmax(logits) - onehot(labels)) / rows: the closed-form backward of "
                   "softmax_cross_entropy", nondiff=_BACKWARD_OP,
               role="row", lowering={"row": _XENT_GRAD_ROWS}, scalar_operands=frozenset({2}),
               checks=(_LABELS,)))


def _mse_infer(pred: TensorType, target: TensorType) -> TensorType:
    dt = same_dtype("mse", pred, target, allowed=FLOATS)
    if pred.shape != target.shape:
        raise ShapeError(f"mse: prediction {pred} and target {target} have different shapes")
    return TensorType(dt, ())


def _mse_vjp(ctx, g):
    dp = ctx.emit("mse_grad", *ctx.inputs, g, rule="2 (p - y) / n", wrt="pred")
    return [dp if ctx.wants(0) else None, ctx.emit("neg", dp, rule="-2 (p - y) / n", wrt="target")
            if ctx.wants(1) else None]


def _mse_grad_infer(p, t, g):
    _mse_infer(p, t)
    _scalar_cotangent("mse_grad", g, p)
    return p


def _mse_nest(b, n):
    p, t = n.inputs
    with b.loop(p.type.shape) as i:
        d = b.let(f"{b.load(p, i)} - {b.load(t, i)}", "d")
        acc = b.accumulate("sum", b.let(f"{d} * {d}"))
    b.store(n.outputs[0], [], b.let(f"{acc} / {b.F}({b.count(p.type.shape)})"))


def _mse_grad_nest(b, n):
    p, t, g = n.inputs
    scale = b.let(f"{b.F}(2.0) * {b.scalar(g)} / {b.F}({b.count(p.type.shape)})", "scale")
    with b.loop(p.type.shape) as i:
        b.store(n.outputs[0], i, b.let(f"({b.load(p, i)} - {b.load(t, i)}) * {scale}"))


register(OpDef("mse", "structured", _mse_infer,
               lambda p, t: np.asarray(np.mean((p - t) ** 2), dtype=p.dtype), arity=2,
               doc="mean over every element of (pred - target)^2", vjp=_mse_vjp,
               role="row", lowering={"nest": _mse_nest}))
register(OpDef("mse_grad", "structured", _mse_grad_infer,
               lambda p, t, g: (2.0 * (p - t) * (g / max(p.size, 1))).astype(p.dtype), arity=3,
               doc="g * 2 (pred - target) / n: the closed-form backward of mse", nondiff=_BACKWARD_OP,
               role="row", lowering={"nest": _mse_grad_nest}, scalar_operands=frozenset({2})))


# ---- normalisation -----------------------------------------------------------------------
def _affine_params(op: str, x: TensorType, *params: TensorType) -> None:
    features = x.shape[-1]
    for p in params:
        same_dtype(op, x, p, allowed=FLOATS)
        if p.shape != (features,):
            raise ShapeError(f"{op}: parameter {p} should be {x.dtype}[{features}] to match the last axis of {x}")


def _layer_norm_infer(x: TensorType, gamma: TensorType, beta: TensorType, *, eps: float) -> TensorType:
    if x.rank < 1:
        raise ShapeError(f"layer_norm: input must have rank 1 or more (a feature axis), got {x}")
    _affine_params("layer_norm", x, gamma, beta)
    return x


def layer_norm_ref(x, gamma, beta, *, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps) * gamma + beta).astype(x.dtype)


def norm_grad_ref(x, gamma, g, eps: float, axes: tuple[int, ...]):
    """Backward of (x - mean) / sqrt(var + eps) * gamma + beta, with statistics over ``axes``:
    dx = (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂)) / σ, where dx̂ = g γ."""
    mean = x.mean(axis=axes, keepdims=True)
    inv = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    xhat = (x - mean) * inv
    dxhat = g * gamma
    dx = inv * (dxhat - dxhat.mean(axis=axes, keepdims=True) - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))
    leading = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), (g * xhat).sum(axis=leading).astype(x.dtype), g.sum(axis=leading).astype(x.dtype)


def _norm_grad_infer(op):
    def infer(x, gamma, g, *, eps):
        require_rank(op, "input", x, tuple(range(2 if op.startswith("batch") else 1, 9)))
        _affine_params(op, x, gamma)
        same_dtype(op, x, g, allowed=FLOATS)
        if g.shape != x.shape:
            raise ShapeError(f"{op}: gradient {g} does not match input {x}")
        return x, gamma, gamma

    return infer


def _norm_vjp(grad_op: str, rule: str):
    def vjp(ctx, g):
        x, gamma = ctx.inputs[:2]
        return list(ctx.emit_multi(grad_op, x, gamma, g, rule=rule, eps=ctx.attrs["eps"], hint=f"grad.{x.name}"))

    return vjp


def _bn_train_vjp(ctx, g, g_mean, g_var):
    """Through the normalised output (batch_norm_train_grad) and, when they reach the loss,
    through the running statistics: new_mean = (1-m)·rm + m·mean(x), new_var = (1-m)·rv +
    m·Σ(x-μ)²/(n-1)."""
    x, gamma, _, rm, rv = ctx.inputs
    m = ctx.attrs["momentum"]
    leading = list(range(x.type.rank - 1))
    dx = dgamma = dbeta = None
    if g is not None:
        dx, dgamma, dbeta = _norm_vjp("batch_norm_train_grad", _BN_RULE)(ctx, g)
    if ctx.wants(0) and (g_mean is not None or g_var is not None):
        n = ctx.emit("count", x, rule="n = rows per feature", axes=leading)
        terms = [] if dx is None else [dx]
        if g_mean is not None:
            per_row = ctx.emit("div", ctx.emit("mul", g_mean, ctx.const(m, x), rule="m·ḡ_mean"), n,
                               rule="m·ḡ_mean / n", wrt="x via running_mean")
            terms.append(ctx.emit("broadcast_to", per_row, rule="the same for every row", wrt="x via running_mean",
                                  shape=list(x.type.shape)))
        if g_var is not None:
            centred = ctx.emit("sub", x, ctx.emit("mean", x, rule="μ", axes=leading, keepdims=True), rule="x - μ")
            scale = ctx.emit("div", ctx.emit("mul", g_var, ctx.const(2 * m, x), rule="2m·ḡ_var"),
                             ctx.emit("sub", n, ctx.const(1.0, x), rule="n - 1"), rule="2m·ḡ_var / (n-1)")
            terms.append(ctx.emit("mul", centred, scale, rule="2m (x - μ) ḡ_var / (n-1)", wrt="x via running_var"))
        dx = terms[0]
        for t in terms[1:]:
            dx = ctx.emit("add", dx, t, rule="sum of the paths to x")
    decay = ctx.const(1.0 - m, x)
    d_rm = ctx.emit("mul", g_mean, decay, rule="(1-m)·ḡ", wrt="running_mean") if ctx.wants(3) and g_mean is not None \
        else None
    d_rv = ctx.emit("mul", g_var, decay, rule="(1-m)·ḡ", wrt="running_var") if ctx.wants(4) and g_var is not None \
        else None
    return [dx, dgamma, dbeta, d_rm, d_rv]


_BN_RULE = "through the batch statistics: dx = (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂)) / σ, dγ = Σ g x̂, dβ = Σ g"


_LAYER_NORM_ROWS = RowProgram(
    (RowStat("mean", "sum", "{x}", finish="{acc} / {F}({C})"),
     RowStat("var", "sum", "({x} - {mean}) * ({x} - {mean})", finish="{acc} / {F}({C})")),
    lets=(("rstd", "{F}(1.0) / math.sqrt({var} + {F}({eps}))"),), out="({x} - {mean}) * {rstd} * {in1} + {in2}")


def _layer_norm_grad_nest(b, n):
    """Per row: mean, variance, then s1 = mean(dx̂), s2 = mean(dx̂ x̂) with dγ, dβ accumulated over
    the rows (so the rows run in order), then dx = (dx̂ - s1 - x̂ s2) / σ."""
    x, gamma, g = n.inputs
    dx, dgamma, dbeta = n.outputs
    F, C = b.F, x.type.shape[-1]
    n_c = f"{F}({C})"
    b.fill(dgamma, f"{F}(0.0)")
    b.fill(dbeta, f"{F}(0.0)")
    with b.loop(x.type.shape[:-1], independent=False, names="r") as r:
        with b.loop([C], names="j") as (j,):
            mean = b.accumulate("sum", b.load(x, [*r, j]))
        mean = b.let(f"{mean} / {n_c}", "mean")
        with b.loop([C], names="j") as (j,):
            d = b.let(f"{b.load(x, [*r, j])} - {mean}", "d")
            var = b.accumulate("sum", b.let(f"{d} * {d}"))
        rstd = b.let(f"{F}(1.0) / math.sqrt({var} / {n_c} + {b.lit(n.attrs['eps'])})", "rstd")
        with b.loop([C], names="j") as (j,):
            xh = b.let(f"({b.load(x, [*r, j])} - {mean}) * {rstd}", "xh")
            gj = b.load(g, [*r, j], "g")
            d = b.let(f"{gj} * {b.load(gamma, [j])}", "d")
            s1 = b.accumulate("sum", d, name="s1")
            s2 = b.accumulate("sum", b.let(f"{d} * {xh}"), name="s2")
            b.store(dgamma, [j], b.let(f"{gj} * {xh}"), add=True)
            b.store(dbeta, [j], gj, add=True)
        s1, s2 = b.let(f"{s1} / {n_c}", "s1"), b.let(f"{s2} / {n_c}", "s2")
        with b.loop([C], names="j") as (j,):
            xh = b.let(f"({b.load(x, [*r, j])} - {mean}) * {rstd}", "xh")
            dxh = b.let(f"{b.load(g, [*r, j])} * {b.load(gamma, [j])}", "dxh")
            b.store(dx, [*r, j], b.let(f"{rstd} * ({dxh} - {s1} - {xh} * {s2})"))


def _column_stats(b, x, eps: float):
    """Per-feature mean, biased variance and 1/sqrt(var + eps) of the rows of ``x`` (all axes but
    the last) into scratch vectors, accumulated in memory order."""
    F, C, lead = b.F, x.type.shape[-1], x.type.shape[:-1]
    rows = f"{F}({b.count(lead)})"
    mean, var = b.scratch([C], x.type.dtype, f"{F}(0.0)", "mean"), b.scratch([C], x.type.dtype, f"{F}(0.0)", "var")
    rstd = b.scratch([C], x.type.dtype, None, "rstd")
    with b.loop(x.type.shape, independent=False) as i:
        b.store(mean, [i[-1]], b.load(x, i), add=True)
    with b.loop([C], names="j") as (j,):
        b.store(mean, [j], b.let(f"{b.load(mean, [j])} / {rows}"))
    with b.loop(x.type.shape, independent=False) as i:
        d = b.let(f"{b.load(x, i)} - {b.load(mean, [i[-1]])}", "d")
        b.store(var, [i[-1]], b.let(f"{d} * {d}"), add=True)
    with b.loop([C], names="j") as (j,):
        v = b.let(f"{b.load(var, [j])} / {rows}", "v")
        b.store(var, [j], v)
        b.store(rstd, [j], b.let(f"{F}(1.0) / math.sqrt({v} + {b.lit(eps)})"))
    return mean, var, rstd


def _batch_norm_train_nest(b, n):
    x, gamma, beta, running_mean, running_var = n.inputs
    y, new_mean, new_var = n.outputs
    F, m, C = b.F, n.attrs["momentum"], x.type.shape[-1]
    mean, var, rstd = _column_stats(b, x, n.attrs["eps"])
    with b.loop(x.type.shape) as i:
        j = i[-1]
        xh = b.let(f"({b.load(x, i)} - {b.load(mean, [j])}) * {b.load(rstd, [j])}", "xh")
        b.store(y, i, b.let(f"{xh} * {b.load(gamma, [j])} + {b.load(beta, [j])}"))
    rows = b.count(x.type.shape[:-1])
    with b.loop([C], names="j") as (j,):  # running statistics: the unbiased variance, as PyTorch keeps it
        b.store(new_mean, [j], b.let(f"{b.lit(1 - m)} * {b.load(running_mean, [j])} + {b.lit(m)} * "
                                     f"{b.load(mean, [j])}"))
        b.store(new_var, [j], b.let(f"{b.lit(1 - m)} * {b.load(running_var, [j])} + {b.lit(m)} * "
                                    f"({b.load(var, [j])} * {F}({rows}) / {F}({rows} - 1))"))


def _batch_norm_grad_nest(b, n):
    """dx, dγ, dβ through the batch statistics, per feature over the rows (in memory order)."""
    x, gamma, g = n.inputs
    dx, dgamma, dbeta = n.outputs
    F, C = b.F, x.type.shape[-1]
    rows = f"{F}({b.count(x.type.shape[:-1])})"
    mean, _, rstd = _column_stats(b, x, n.attrs["eps"])
    s1, s2 = b.scratch([C], x.type.dtype, f"{F}(0.0)", "s1"), b.scratch([C], x.type.dtype, f"{F}(0.0)", "s2")
    b.fill(dgamma, f"{F}(0.0)")
    b.fill(dbeta, f"{F}(0.0)")
    with b.loop(x.type.shape, independent=False) as i:
        j = i[-1]
        xh = b.let(f"({b.load(x, i)} - {b.load(mean, [j])}) * {b.load(rstd, [j])}", "xh")
        gi = b.load(g, i, "g")
        d = b.let(f"{gi} * {b.load(gamma, [j])}", "d")
        b.store(s1, [j], d, add=True)
        b.store(s2, [j], b.let(f"{d} * {xh}"), add=True)
        b.store(dgamma, [j], b.let(f"{gi} * {xh}"), add=True)
        b.store(dbeta, [j], gi, add=True)
    with b.loop([C], names="j") as (j,):
        b.store(s1, [j], b.let(f"{b.load(s1, [j])} / {rows}"))
        b.store(s2, [j], b.let(f"{b.load(s2, [j])} / {rows}"))
    with b.loop(x.type.shape) as i:
        j = i[-1]
        r = b.load(rstd, [j], "rstd")
        xh = b.let(f"({b.load(x, i)} - {b.load(mean, [j])}) * {r}", "xh")
        dxh = b.let(f"{b.load(g, i)} * {b.load(gamma, [j])}", "dxh")
        b.store(dx, i, b.let(f"{r} * ({dxh} - {b.load(s1, [j])} - {xh} * {b.load(s2, [j])})"))


def _batch_norm_infer_nest(b, n):
    x, gamma, beta, mean, var = n.inputs
    with b.loop(x.type.shape) as i:
        j = i[-1]
        scale = b.let(f"{b.load(gamma, [j])} / math.sqrt({b.load(var, [j])} + {b.lit(n.attrs['eps'])})", "scale")
        b.store(n.outputs[0], i, b.let(f"({b.load(x, i)} - {b.load(mean, [j])}) * {scale} + {b.load(beta, [j])}"))


_NORM_GRAD_OUTPUTS = ("dx", "dgamma", "dbeta")
register(OpDef("layer_norm", "structured", _layer_norm_infer, layer_norm_ref, arity=3,
               attrs={"eps": Attr("float", 1e-5)},
               doc="normalise over the last axis to zero mean and unit variance, then scale and shift",
               vjp=_norm_vjp("layer_norm_grad", "dx = (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂)) / σ, dγ = Σ g x̂, dβ = Σ g"),
               role="row", lowering={"row": _LAYER_NORM_ROWS}))
register(OpDef("layer_norm_grad", "structured", _norm_grad_infer("layer_norm_grad"),
               lambda x, gamma, g, *, eps: norm_grad_ref(x, gamma, g, eps, (-1,)), arity=3,
               attrs={"eps": Attr("float", 1e-5)}, output_names=_NORM_GRAD_OUTPUTS,
               doc="the backward of layer_norm: (dx, dgamma, dbeta)", nondiff=_BACKWARD_OP,
               role="row", lowering={"nest": _layer_norm_grad_nest}))


def _batch_norm_check(op, x, gamma, beta, mean, var):
    if x.rank < 2:
        raise ShapeError(f"{op}: input must have a batch axis and a feature axis, got {x}")
    _affine_params(op, x, gamma, beta, mean, var)


def _bn_train_infer(x, gamma, beta, mean, var, *, momentum: float, eps: float):
    _batch_norm_check("batch_norm_train", x, gamma, beta, mean, var)
    return x, mean, var


def bn_train_ref(x, gamma, beta, running_mean, running_var, *, momentum, eps):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    var = ((x - mean) ** 2).mean(axis=axes)
    count = x.size // max(x.shape[-1], 1)
    if count < 2:
        raise InputError(f"batch_norm_train: a training batch needs at least 2 values per feature, got {count} "
                         "(batch size 1? use a larger batch, or LayerNorm)")
    unbiased = var * (count / (count - 1))
    y = ((x - mean) / np.sqrt(var + eps) * gamma + beta).astype(x.dtype)
    new_mean = ((1 - momentum) * running_mean + momentum * mean).astype(x.dtype)
    new_var = ((1 - momentum) * running_var + momentum * unbiased).astype(x.dtype)
    return y, new_mean, new_var


register(OpDef("batch_norm_train", "structured", _bn_train_infer, bn_train_ref, arity=5,
               attrs={"momentum": Attr("float", 0.1), "eps": Attr("float", 1e-5)},
               output_names=("out", "running_mean", "running_var"),
               doc="normalise each feature (last axis) with the batch's mean and variance; also returns "
                   "the running statistics updated with momentum (unbiased variance, as PyTorch)",
               vjp=_bn_train_vjp, role="row", lowering={"nest": _batch_norm_train_nest},
               checks=(RowsCheck(0),), aligned={1: 3, 2: 4}))
register(OpDef("batch_norm_train_grad", "structured", _norm_grad_infer("batch_norm_train_grad"),
               lambda x, gamma, g, *, eps: norm_grad_ref(x, gamma, g, eps, tuple(range(x.ndim - 1))), arity=3,
               attrs={"eps": Attr("float", 1e-5)}, output_names=_NORM_GRAD_OUTPUTS,
               doc="the backward of batch_norm_train through the batch statistics: (dx, dgamma, dbeta)",
               nondiff=_BACKWARD_OP, role="row", lowering={"nest": _batch_norm_grad_nest}))


def _bn_infer_infer(x, gamma, beta, mean, var, *, eps: float):
    _batch_norm_check("batch_norm_infer", x, gamma, beta, mean, var)
    return x


def _bn_infer_vjp(ctx, g):
    x, gamma, _, mean, var = ctx.inputs
    inv = ctx.emit("rsqrt", ctx.emit("add", var, ctx.const(ctx.attrs["eps"], var), rule="var + eps"),
                   rule="1/σ with the running variance")
    leading = list(range(x.type.rank - 1))
    grads: list = [None] * 5
    g_scaled = ctx.emit("mul", g, ctx.emit("mul", gamma, inv, rule="γ/σ"), rule="g γ/σ")
    if ctx.wants(0):
        grads[0] = g_scaled
    if ctx.wants(1) or ctx.wants(4):
        centred = ctx.emit("sub", x, mean, rule="x - μ")
    if ctx.wants(1):
        xhat = ctx.emit("mul", centred, inv, rule="x̂")
        grads[1] = ctx.emit("sum", ctx.emit("mul", g, xhat, rule="g x̂"), rule="Σ g x̂", wrt="γ", axes=leading)
    if ctx.wants(2):
        grads[2] = ctx.emit("sum", g, rule="Σ g", wrt="β", axes=leading)
    if ctx.wants(3):
        grads[3] = ctx.emit("neg", ctx.emit("sum", g_scaled, rule="Σ g γ/σ", axes=leading), rule="-Σ g γ/σ",
                            wrt="running mean")
    if ctx.wants(4):
        inv2 = ctx.emit("mul", inv, inv, rule="1/σ²")
        t = ctx.emit("mul", ctx.emit("mul", g_scaled, centred, rule="g γ (x - μ)/σ"), inv2, rule="g γ (x - μ)/σ³")
        grads[4] = ctx.emit("mul", ctx.emit("sum", t, rule="Σ g γ (x - μ)/σ³", axes=leading),
                            ctx.const(-0.5, x), rule="-½ Σ g γ (x - μ) (var + eps)^(-3/2)", wrt="running var")
    return grads


register(OpDef("batch_norm_infer", "structured", _bn_infer_infer,
               lambda x, g, b, m, v, *, eps: ((x - m) / np.sqrt(v + eps) * g + b).astype(x.dtype), arity=5,
               attrs={"eps": Attr("float", 1e-5)},
               doc="normalise each feature with the running statistics (inference mode)", vjp=_bn_infer_vjp,
               role="row", lowering={"nest": _batch_norm_infer_nest}))


# ---- lookup ------------------------------------------------------------------------------
def _embedding_infer(table: TensorType, ids: TensorType) -> TensorType:
    require_rank("embedding", "table", table, 2)
    require_dtype("embedding", "the table", table, FLOATS)
    require_dtype("embedding", "ids", ids, INTS)
    return TensorType(table.dtype, (*ids.shape, table.shape[1]))


def embedding_ref(table, ids):
    check_indices("embedding", "ids", ids, table.shape[0])
    return table[ids]


def _embedding_vjp(ctx, g):
    table, ids = ctx.inputs
    return [ctx.emit("embedding_grad", ids, g, rule="scatter-add g into the rows picked by ids",
                     rows=table.type.shape[0]), None]


def _embedding_nest(b, n):
    table, ids = n.inputs
    with b.loop(ids.type.shape) as i:
        row = b.load(ids, i, "row")
        with b.loop([table.type.shape[1]], names="d") as (d,):
            b.store(n.outputs[0], [*i, d], b.load(table, [b.via(row), d]))


def _embedding_grad_nest(b, n):
    ids, g = n.inputs
    b.fill(n.outputs[0], f"{b.F}(0.0)")
    with b.loop(ids.type.shape, independent=False) as i:  # ids may repeat: rows add up in order
        row = b.load(ids, i, "row")
        with b.loop([g.type.shape[-1]], names="d") as (d,):
            b.store(n.outputs[0], [b.via(row), d], b.load(g, [*i, d]), add=True)


register(OpDef("embedding", "structured", _embedding_infer, embedding_ref, arity=2,
               doc="rows of table picked by integer ids: out[..., :] = table[ids[...], :]", vjp=_embedding_vjp,
               role="layout", lowering={"nest": _embedding_nest},
               checks=(IndexCheck(1, lambda node: node.inputs[0].type.shape[0], "ids"),)))


def _embedding_grad_infer(ids: TensorType, g: TensorType, *, rows: int) -> TensorType:
    require_dtype("embedding_grad", "ids", ids, INTS)
    require_rank("embedding_grad", "the gradient", g, tuple(range(1, 9)))
    if rows < 0:
        raise ShapeError(f"embedding_grad: rows={rows} must not be negative")
    same_dtype("embedding_grad", g, allowed=FLOATS)
    if g.shape[:-1] != ids.shape:
        raise ShapeError(f"embedding_grad: gradient {g} does not match ids {ids}")
    return TensorType(g.dtype, (rows, g.shape[-1]))


def embedding_grad_ref(ids, g, *, rows: int):
    check_indices("embedding_grad", "ids", ids, rows)
    out = np.zeros((rows, g.shape[-1]), dtype=g.dtype)
    np.add.at(out, ids.reshape(-1), g.reshape(-1, g.shape[-1]))
    return out


register(OpDef("embedding_grad", "structured", _embedding_grad_infer, embedding_grad_ref, arity=2,
               attrs={"rows": Attr("int")}, doc="the backward of embedding: rows of g summed into a zero table "
                                                "at ids (scatter-add)", nondiff=_BACKWARD_OP,
               lowering={"nest": _embedding_grad_nest},
               checks=(IndexCheck(0, lambda node: node.attrs["rows"], "ids"),)))


# ---- attention masks ---------------------------------------------------------------------
def _causal_mask_infer(*, shape) -> TensorType:
    if len(shape) != 2:
        raise ShapeError(f"causal_mask: the shape must be [queries, keys], got {list(shape)}")
    return TensorType(DType.bool, shape)


def _causal_mask_nest(b, n):
    """out[i, j] = j <= i: query i sees key j at or before it (PyTorch's is_causal, top-left aligned)."""
    with b.loop(n.outputs[0].type.shape) as (i, j):
        b.store(n.outputs[0], [i, j], b.let(f"{j} <= {i}", "keep"))


def _causal_mask_ref(*, shape):
    assert all(isinstance(d, int) for d in shape), "causal_mask ref needs concrete dims (see interpreter)"
    return np.tril(np.ones(shape, dtype=bool))


register(OpDef("causal_mask", "source", _causal_mask_infer, _causal_mask_ref, arity=0,
               attrs={"shape": Attr("dims")}, doc="bool[Tq,Tk], true where key j <= query i (lower triangle)",
               nondiff="a mask has no inputs", role="opaque", lowering={"nest": _causal_mask_nest}))
