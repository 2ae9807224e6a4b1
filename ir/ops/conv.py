"""Images in NCHW: 2-D convolution (stride, padding, dilation, groups), max and average pooling.

Each forward op is a direct loop nest that reduces a window into a local and stores every output
element once (role ``layout``), so a bias add and an activation run at its store. Padding never
reads out of bounds: the convolutions read a zero-padded copy of their input (a scratch of the
kernel), the pools clamp the index and select (-inf or 0) where the window leaves the image.
The backward ops scatter-add into their result, one image plane per parallel iteration.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from gradfuse.errors import ShapeError

from ..registry import Attr, OpDef, register
from ..types import TensorType
from .common import FLOATS, require_rank, same_dtype

_BACKWARD_OP = "a backward op: gradients of gradients are not supported"
_PAIR = {"stride": Attr("ints", (1, 1)), "padding": Attr("ints", (0, 0)), "dilation": Attr("ints", (1, 1))}
_CONV_ATTRS = {**_PAIR, "groups": Attr("int", 1)}
_POOL_ATTRS = {"kernel": Attr("ints"), "stride": Attr("ints"), "padding": Attr("ints", (0, 0))}
_AVG_ATTRS = {**_POOL_ATTRS, "count_include_pad": Attr("bool", True)}


# ---- shape rules -------------------------------------------------------------------------
def _pairs(op: str, **attrs) -> None:
    for name, value in attrs.items():
        least = 0 if name == "padding" else 1
        if len(value) != 2 or any(v < least for v in value):
            raise ShapeError(f"{op}: {name}={list(value)} should be two ints >= {least} (height, width)")


def _image(op: str, what: str, x: TensorType) -> None:
    require_rank(op, what, x, 4, hint="images are NCHW: [batch, channels, height, width]")
    same_dtype(op, x, allowed=FLOATS)
    if any(isinstance(d, str) for d in x.shape[1:]):
        raise ShapeError(f"{op}: {what} {x} must have fixed channels, height and width (only the batch is symbolic)")


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output positions along one axis (PyTorch's floor rule)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _spatial(op: str, x: TensorType, kernel, stride, padding, dilation=(1, 1)) -> tuple[int, int]:
    oh, ow = (out_size(x.shape[2 + a], kernel[a], stride[a], padding[a], dilation[a]) for a in range(2))
    if oh < 1 or ow < 1:
        span = [dilation[a] * (kernel[a] - 1) + 1 for a in range(2)]
        raise ShapeError(f"{op}: a {span[0]}x{span[1]} window does not fit the {x.shape[2]}x{x.shape[3]} image of "
                         f"{x} with padding {list(padding)}", hint="use a smaller kernel, more padding, or pool less")
    return oh, ow


def _conv_infer(x: TensorType, w: TensorType, *, stride, padding, dilation, groups) -> TensorType:
    _image("conv2d", "input", x)
    require_rank("conv2d", "weight", w, 4, hint="the weight is [out_channels, in_channels/groups, kh, kw]")
    same_dtype("conv2d", x, w, allowed=FLOATS)
    _pairs("conv2d", stride=stride, padding=padding, dilation=dilation)
    c, o = x.shape[1], w.shape[0]
    if groups < 1 or c % groups or o % groups:
        raise ShapeError(f"conv2d: groups={groups} must divide the input channels ({c}) and output channels ({o})")
    if w.shape[1] * groups != c:
        raise ShapeError(f"conv2d: weight {w} takes {w.shape[1] * groups} input channels, the input {x} has {c}",
                         hint=f"the weight's axis 1 is in_channels/groups = {c // groups}")
    oh, ow = _spatial("conv2d", x, w.shape[2:], stride, padding, dilation)
    return TensorType(x.dtype, (x.shape[0], o, oh, ow))


def _conv_grad_input_infer(g: TensorType, w: TensorType, *, stride, padding, dilation, groups, size) -> TensorType:
    _image("conv2d_grad_input", "gradient", g)
    require_rank("conv2d_grad_input", "weight", w, 4)
    same_dtype("conv2d_grad_input", g, w, allowed=FLOATS)
    if len(size) != 2:
        raise ShapeError(f"conv2d_grad_input: size={list(size)} should be the input's (height, width)")
    x = TensorType(g.dtype, (g.shape[0], w.shape[1] * groups, *size))
    if _conv_infer(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups) != g:
        raise ShapeError(f"conv2d_grad_input: gradient {g} is not the output of a conv2d of {x} with weight {w}")
    return x


def _conv_grad_weight_infer(x: TensorType, g: TensorType, *, stride, padding, dilation, groups, kernel) -> TensorType:
    _image("conv2d_grad_weight", "input", x)
    _image("conv2d_grad_weight", "gradient", g)
    same_dtype("conv2d_grad_weight", x, g, allowed=FLOATS)
    if len(kernel) != 2 or groups < 1 or x.shape[1] % groups:
        raise ShapeError(f"conv2d_grad_weight: kernel={list(kernel)} and groups={groups} do not fit {x}")
    w = TensorType(x.dtype, (g.shape[1], x.shape[1] // groups, *kernel))
    if _conv_infer(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups) != g:
        raise ShapeError(f"conv2d_grad_weight: gradient {g} is not the output of a conv2d of {x} with weight {w}")
    return w


def _pool_infer(op: str):
    def infer(x: TensorType, *, kernel, stride, padding, **_) -> TensorType:
        _image(op, "input", x)
        _pairs(op, kernel=kernel, stride=stride, padding=padding)
        if any(2 * padding[a] > kernel[a] for a in range(2)):
            raise ShapeError(f"{op}: padding {list(padding)} should be at most half the kernel {list(kernel)}",
                             hint="a window must hold at least one pixel of the image")
        return TensorType(x.dtype, (*x.shape[:2], *_spatial(op, x, kernel, stride, padding)))

    return infer


def _max_pool_grad_infer(x: TensorType, g: TensorType, **attrs) -> TensorType:
    if _pool_infer("max_pool2d_grad")(x, **attrs) != g:
        raise ShapeError(f"max_pool2d_grad: gradient {g} is not the output of max_pool2d on {x}")
    return x


def _avg_pool_grad_infer(g: TensorType, *, size, **attrs) -> TensorType:
    _image("avg_pool2d_grad", "gradient", g)
    if len(size) != 2:
        raise ShapeError(f"avg_pool2d_grad: size={list(size)} should be the input's (height, width)")
    x = TensorType(g.dtype, (*g.shape[:2], *size))
    if _pool_infer("avg_pool2d_grad")(x, **attrs) != g:
        raise ShapeError(f"avg_pool2d_grad: gradient {g} is not the output of avg_pool2d on {x}")
    return x


# ---- numpy references --------------------------------------------------------------------
def _pad(x, padding, value=0.0):
    ph, pw = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _windows(xp, kernel, stride, dilation, out):
    """A view [N, C, KH, KW, OH, OW] of the padded image ``xp``: element (kh, kw) of window (oh, ow)."""
    xp = np.ascontiguousarray(xp)
    n, c = xp.shape[:2]
    sn, sc, sh, sw = xp.strides
    return as_strided(xp, (n, c, *kernel, *out), (sn, sc, sh * dilation[0], sw * dilation[1],
                                                   sh * stride[0], sw * stride[1]), writeable=False)


def conv2d_ref(x, w, *, stride, padding, dilation, groups):
    """Sums in float64 (then rounded to the dtype): the kernels' order of summation differs."""
    n, c = x.shape[:2]
    o, cg, kh, kw = w.shape
    out = [out_size(x.shape[2 + a], w.shape[2 + a], stride[a], padding[a], dilation[a]) for a in range(2)]
    win = _windows(_pad(x.astype(np.float64), padding), (kh, kw), stride, dilation, out)
    win = win.reshape(n, groups, cg, kh, kw, *out)
    wg = w.astype(np.float64).reshape(groups, o // groups, cg, kh, kw)
    y = np.einsum("ngckluv,gockl->ngouv", win, wg)
    return y.reshape(n, o, *out).astype(x.dtype)


def conv2d_grad_input_ref(g, w, *, stride, padding, dilation, groups, size):
    n, o, oh, ow = g.shape
    _, cg, kh, kw = w.shape
    ph, pw = padding
    dxp = np.zeros((n, groups, cg, size[0] + 2 * ph, size[1] + 2 * pw))
    gg = g.astype(np.float64).reshape(n, groups, o // groups, oh, ow)
    wg = w.astype(np.float64).reshape(groups, o // groups, cg, kh, kw)
    for i in range(kh):
        for j in range(kw):
            h0, w0 = i * dilation[0], j * dilation[1]
            dxp[:, :, :, h0:h0 + stride[0] * (oh - 1) + 1:stride[0], w0:w0 + stride[1] * (ow - 1) + 1:stride[1]] += \
                np.einsum("ngouv,goc->ngcuv", gg, wg[..., i, j])
    dx = dxp.reshape(n, groups * cg, *dxp.shape[3:])[:, :, ph:ph + size[0], pw:pw + size[1]]
    return np.ascontiguousarray(dx).astype(g.dtype)


def conv2d_grad_weight_ref(x, g, *, stride, padding, dilation, groups, kernel):
    n, c = x.shape[:2]
    o, out = g.shape[1], g.shape[2:]
    win = _windows(_pad(x.astype(np.float64), padding), kernel, stride, dilation, out)
    win = win.reshape(n, groups, c // groups, *kernel, *out)
    gg = g.astype(np.float64).reshape(n, groups, o // groups, *out)
    dw = np.einsum("ngckluv,ngouv->gockl", win, gg)
    return dw.reshape(o, c // groups, *kernel).astype(x.dtype)


def _pool_windows(x, kernel, stride, padding, fill):
    """The windows [N, C, K, OH, OW] (K = KH·KW in row-major order) with ``fill`` outside the
    image, and where each window element lies inside it."""
    out = [out_size(x.shape[2 + a], kernel[a], stride[a], padding[a]) for a in range(2)]
    win = _windows(_pad(x, padding, fill), kernel, stride, (1, 1), out)
    inside = _windows(_pad(np.ones(x.shape[2:], bool)[None, None], padding, False), kernel, stride, (1, 1), out)
    k = kernel[0] * kernel[1]
    return win.reshape(*x.shape[:2], k, *out), inside.reshape(1, 1, k, *out)


def max_pool2d_ref(x, *, kernel, stride, padding):
    win, _ = _pool_windows(x, kernel, stride, padding, -np.inf)
    return win.max(axis=2).astype(x.dtype)  # NaN propagates


def max_pool_choice(x, kernel, stride, padding):
    """The window element (0..KH·KW-1) each output takes its value from, as PyTorch picks it: the
    first maximal one (ties), the last NaN where there is one; -inf windows: the first pixel inside."""
    win, inside = _pool_windows(x, kernel, stride, padding, -np.inf)
    m = win.max(axis=2, keepdims=True)
    first = np.argmax(inside & (win == m), axis=2)
    nan = np.isnan(win) & inside
    last_nan = win.shape[2] - 1 - np.argmax(nan[:, :, ::-1], axis=2)
    return np.where(np.isnan(m[:, :, 0]), last_nan, first)


def max_pool2d_grad_ref(x, g, *, kernel, stride, padding):
    n, c, oh, ow = g.shape
    k = max_pool_choice(x, kernel, stride, padding)
    rows = np.arange(oh)[:, None] * stride[0] - padding[0] + k // kernel[1]
    cols = np.arange(ow)[None, :] * stride[1] - padding[1] + k % kernel[1]
    dx = np.zeros(x.shape, x.dtype)
    ni, ci = np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None]
    np.add.at(dx, (np.broadcast_to(ni, k.shape), np.broadcast_to(ci, k.shape), rows, cols), g)
    return dx


def _avg_divisor(shape, kernel, stride, padding, count_include_pad):
    if count_include_pad:
        return float(kernel[0] * kernel[1])
    _, inside = _pool_windows(np.zeros((1, 1, *shape)), kernel, stride, padding, 0.0)
    return inside.sum(axis=2).astype(np.float64)


def avg_pool2d_ref(x, *, kernel, stride, padding, count_include_pad):
    win, _ = _pool_windows(x.astype(np.float64), kernel, stride, padding, 0.0)
    return (win.sum(axis=2) / _avg_divisor(x.shape[2:], kernel, stride, padding, count_include_pad)).astype(x.dtype)


def avg_pool2d_grad_ref(g, *, kernel, stride, padding, count_include_pad, size):
    n, c, oh, ow = g.shape
    ph, pw = padding
    share = g.astype(np.float64) / _avg_divisor(size, kernel, stride, padding, count_include_pad)
    dxp = np.zeros((n, c, size[0] + 2 * ph, size[1] + 2 * pw))
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            dxp[:, :, i:i + stride[0] * (oh - 1) + 1:stride[0], j:j + stride[1] * (ow - 1) + 1:stride[1]] += share
    return np.ascontiguousarray(dxp[:, :, ph:ph + size[0], pw:pw + size[1]]).astype(g.dtype)


# ---- VJP rules ---------------------------------------------------------------------------
def _conv_vjp(ctx, g):
    x, w = ctx.inputs
    a = {k: ctx.attrs[k] for k in _CONV_ATTRS}
    dx = ctx.emit("conv2d_grad_input", g, w, rule="the transposed convolution of g with w", wrt="input",
                  size=list(x.type.shape[2:]), **a) if ctx.wants(0) else None
    dw = ctx.emit("conv2d_grad_weight", x, g, rule="Σ over batch and positions of g × the input window",
                  wrt="weight", kernel=list(w.type.shape[2:]), **a) if ctx.wants(1) else None
    return [dx, dw]


def _max_pool_vjp(ctx, g):
    a = {k: ctx.attrs[k] for k in _POOL_ATTRS}
    return [ctx.emit("max_pool2d_grad", ctx.inputs[0], g, rule="g to the first maximal element of each window", **a)]


def _avg_pool_vjp(ctx, g):
    a = {k: ctx.attrs[k] for k in _AVG_ATTRS}
    return [ctx.emit("avg_pool2d_grad", g, rule="g / window size to every element of its window",
                     size=list(ctx.inputs[0].type.shape[2:]), **a)]


# ---- loop nests (the builder of codegen/loop_nests.py) -------------------------------------
def _padded(b, x, padding):
    """``x`` itself, or a zero-padded copy of it in a scratch array (the nests then index it
    without bounds checks)."""
    ph, pw = padding
    if not ph and not pw:
        return x
    n, c, h, w = x.type.shape
    xp = b.scratch([n, c, h + 2 * ph, w + 2 * pw], x.type.dtype, f"{b.F}(0.0)", "xpad")
    with b.loop(x.type.shape) as i:
        b.store(xp, [i[0], i[1], b.at(i[2], 1, ph), b.at(i[3], 1, pw)], b.load(x, i))
    return xp


def _tap(b, i_n, channel, oh, ow, kh, kw, a):
    """The padded input pixel (kh, kw) of the window of output (oh, ow)."""
    (sh, sw), (dh, dw) = a["stride"], a["dilation"]
    return [i_n, channel, b.at(oh, sh, kh if dh == 1 else f"{kh} * {dh}"),
            b.at(ow, sw, kw if dw == 1 else f"{kw} * {dw}")]


def _group_base(b, o, out_per_group: int, in_per_group: int, groups: int):
    return 0 if groups == 1 else b.let(f"({o} // {out_per_group}) * {in_per_group}", "cbase")


def _conv_nest(b, n):
    x, w = n.inputs
    y = n.outputs[0]
    o_all, cg, kh_, kw_ = w.type.shape
    groups = n.attrs["groups"]
    src = _padded(b, x, n.attrs["padding"])
    with b.loop(y.type.shape) as (i_n, o, oh, ow):
        base = _group_base(b, o, o_all // groups, cg, groups)
        with b.loop([cg, kh_, kw_], names="k") as (c, kh, kw):
            xv = b.load(src, _tap(b, i_n, b.at(c, 1, base), oh, ow, kh, kw, n.attrs), "xv")
            acc = b.accumulate("sum", b.let(f"{xv} * {b.load(w, [o, c, kh, kw], 'wv')}"))
        b.store(y, [i_n, o, oh, ow], acc)


def _conv_grad_input_nest(b, n):
    """Scatter: each gradient element times the weight added into the (padded) input it read."""
    g, w = n.inputs
    dx = n.outputs[0]
    o_all, cg, kh_, kw_ = w.type.shape
    groups, (ph, pw) = n.attrs["groups"], n.attrs["padding"]
    nb, c_all, h, wd = dx.type.shape
    if ph or pw:
        dst = b.scratch([nb, c_all, h + 2 * ph, wd + 2 * pw], dx.type.dtype, f"{b.F}(0.0)", "dxpad")
    else:
        b.fill(dx, f"{b.F}(0.0)")
        dst = dx
    with b.loop([nb]) as (i_n,):
        with b.loop(g.type.shape[1:], independent=False, names="o") as (o, oh, ow):
            gv = b.load(g, [i_n, o, oh, ow], "gv")
            base = _group_base(b, o, o_all // groups, cg, groups)
            with b.loop([cg, kh_, kw_], independent=False, names="k") as (c, kh, kw):
                b.store(dst, _tap(b, i_n, b.at(c, 1, base), oh, ow, kh, kw, n.attrs),
                        b.let(f"{gv} * {b.load(w, [o, c, kh, kw], 'wv')}"), add=True)
    if dst is not dx:
        with b.loop(dx.type.shape) as i:
            b.store(dx, i, b.load(dst, [i[0], i[1], b.at(i[2], 1, ph), b.at(i[3], 1, pw)]))


def _conv_grad_weight_nest(b, n):
    x, g = n.inputs
    dw = n.outputs[0]
    o_all, cg = dw.type.shape[:2]
    groups = n.attrs["groups"]
    src = _padded(b, x, n.attrs["padding"])
    with b.loop(dw.type.shape) as (o, c, kh, kw):
        base = _group_base(b, o, o_all // groups, cg, groups)
        with b.loop([g.type.shape[0], *g.type.shape[2:]], names="r") as (i_n, oh, ow):
            xv = b.load(src, _tap(b, i_n, b.at(c, 1, base), oh, ow, kh, kw, n.attrs), "xv")
            acc = b.accumulate("sum", b.let(f"{b.load(g, [i_n, o, oh, ow], 'gv')} * {xv}"))
        b.store(dw, [o, c, kh, kw], acc)


_MAX = "({a} if {a} > {b} or {a} != {a} else {b})"  # NaN propagates (as the max reduction's)


def _pool_pixel(b, x, i_n, c, oh, ow, kh, kw, a, outside: str):
    """(value, inside) of window pixel (kh, kw): a clamped load and a select where padding may
    put it outside the image; inside is None without padding."""
    (sh, sw), (ph, pw) = a["stride"], a["padding"]
    h, w = x.type.shape[2:]
    if not ph and not pw:
        return b.load(x, [i_n, c, b.at(oh, sh, kh), b.at(ow, sw, kw)], "xv"), None
    ih, iw = b.let(f"{oh} * {sh} + {kh} - {ph}", "ih"), b.let(f"{ow} * {sw} + {kw} - {pw}", "iw")
    inside = b.let(f"{ih} >= 0 and {ih} < {h} and {iw} >= 0 and {iw} < {w}", "inside")
    hc, wc = b.let(f"min(max({ih}, 0), {h - 1})", "hc"), b.let(f"min(max({iw}, 0), {w - 1})", "wc")
    v = b.load(x, [i_n, c, b.via(hc), b.via(wc)], "xv")
    return b.let(f"({v} if {inside} else {outside})", "xs"), inside


def _max_pool_nest(b, n):
    (x,), y, a = n.inputs, n.outputs[0], n.attrs
    with b.loop(y.type.shape) as (i_n, c, oh, ow):
        with b.loop(a["kernel"], names="k") as (kh, kw):
            v, _ = _pool_pixel(b, x, i_n, c, oh, ow, kh, kw, a, f"{b.F}(-np.inf)")
            m = b.accumulate(_MAX, v)
        b.store(y, [i_n, c, oh, ow], m)


def _max_pool_pick(b, x, i_n, c, oh, ow, a) -> str:
    """The window element (kh·KW + kw) PyTorch gives the gradient of window (oh, ow): its max, then
    the first element equal to it, or the last NaN (max_pool_choice)."""
    (kh_, kw_) = a["kernel"]
    k_all = kh_ * kw_
    with b.loop(a["kernel"], names="k") as (kh, kw):
        v, _ = _pool_pixel(b, x, i_n, c, oh, ow, kh, kw, a, f"{b.F}(-np.inf)")
        m = b.accumulate(_MAX, v, name="m")
    with b.loop(a["kernel"], names="k") as (kh, kw):
        v, inside = _pool_pixel(b, x, i_n, c, oh, ow, kh, kw, a, f"{b.F}(-np.inf)")
        k = b.let(f"{kh} * {kw_} + {kw}", "k")
        inside = "" if inside is None else f"{inside} and "
        first = b.accumulate("min({a}, {b})", b.let(f"({k} if {inside}{v} == {m} else {k_all})", "hit"),
                             identity=str(k_all), name="first")
        nan = b.accumulate("max({a}, {b})", b.let(f"({k} if {inside}{v} != {v} else -1)", "isnan"),
                           identity="-1", name="last_nan")
    return b.let(f"({nan} if {m} != {m} else {first})", "pick")


def _max_pool_grad_nest(b, n):
    """Per window: the element PyTorch gives the gradient (_max_pool_pick), then one add into dx;
    windows overlap when the stride is below the kernel, so they run in order. Windows that tile
    the image (stride = kernel, no padding) store each pixel once instead: g or 0."""
    x, g = n.inputs
    dx, a = n.outputs[0], n.attrs
    (kh_, kw_), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    (h, w), (oh_, ow_) = x.type.shape[2:], g.type.shape[2:]
    if (sh, sw) == (kh_, kw_) and not ph and not pw and (h, w) == (oh_ * kh_, ow_ * kw_):
        with b.loop(g.type.shape) as (i_n, c, oh, ow):
            k = _max_pool_pick(b, x, i_n, c, oh, ow, a)
            gv = b.load(g, [i_n, c, oh, ow], "gv")
            with b.loop(a["kernel"], names="k") as (kh, kw):
                b.store(dx, [i_n, c, b.at(oh, sh, kh), b.at(ow, sw, kw)],
                        b.let(f"({gv} if {kh} * {kw_} + {kw} == {k} else {b.F}(0.0))"))
        return
    b.fill(dx, f"{b.F}(0.0)")
    with b.loop(x.type.shape[:2]) as (i_n, c):
        with b.loop(g.type.shape[2:], independent=False, names="o") as (oh, ow):
            k = _max_pool_pick(b, x, i_n, c, oh, ow, a)
            hc = b.let(f"min(max({oh} * {sh} + {k} // {kw_} - {ph}, 0), {h - 1})", "hc")
            wc = b.let(f"min(max({ow} * {sw} + {k} % {kw_} - {pw}, 0), {w - 1})", "wc")
            b.store(dx, [i_n, c, b.via(hc), b.via(wc)], b.load(g, [i_n, c, oh, ow], "gv"), add=True)


def _avg_divisor_expr(b, oh, ow, shape, a) -> str:
    """The divisor of window (oh, ow): KH·KW, or its pixels inside the image."""
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    if a["count_include_pad"] or (not ph and not pw):
        return b.lit(kh * kw)
    h, w = shape
    return b.let(f"{b.F}((min({oh} * {sh} - {ph} + {kh}, {h}) - max({oh} * {sh} - {ph}, 0)) * "
                 f"(min({ow} * {sw} - {pw} + {kw}, {w}) - max({ow} * {sw} - {pw}, 0)))", "count")


def _avg_pool_nest(b, n):
    (x,), y, a = n.inputs, n.outputs[0], n.attrs
    with b.loop(y.type.shape) as (i_n, c, oh, ow):
        with b.loop(a["kernel"], names="k") as (kh, kw):
            v, _ = _pool_pixel(b, x, i_n, c, oh, ow, kh, kw, a, f"{b.F}(0.0)")
            s = b.accumulate("sum", v)
        b.store(y, [i_n, c, oh, ow], b.let(f"{s} / {_avg_divisor_expr(b, oh, ow, x.type.shape[2:], a)}"))


def _avg_pool_grad_nest(b, n):
    (g,), dx, a = n.inputs, n.outputs[0], n.attrs
    b.fill(dx, f"{b.F}(0.0)")
    with b.loop(g.type.shape[:2]) as (i_n, c):
        with b.loop(g.type.shape[2:], independent=False, names="o") as (oh, ow):
            share = b.let(f"{b.load(g, [i_n, c, oh, ow], 'gv')} / "
                          f"{_avg_divisor_expr(b, oh, ow, dx.type.shape[2:], a)}", "share")
            (sh, sw), (ph, pw) = a["stride"], a["padding"]
            with b.loop(a["kernel"], independent=False, names="k") as (kh, kw):
                if not ph and not pw:
                    b.store(dx, [i_n, c, b.at(oh, sh, kh), b.at(ow, sw, kw)], share, add=True)
                else:
                    h, w = dx.type.shape[2:]
                    ih, iw = b.let(f"{oh} * {sh} + {kh} - {ph}", "ih"), b.let(f"{ow} * {sw} + {kw} - {pw}", "iw")
                    inside = b.let(f"{ih} >= 0 and {ih} < {h} and {iw} >= 0 and {iw} < {w}", "inside")
                    hc, wc = b.let(f"min(max({ih}, 0), {h - 1})", "hc"), b.let(f"min(max({iw}, 0), {w - 1})", "wc")
                    b.store(dx, [i_n, c, b.via(hc), b.via(wc)], b.let(f"({share} if {inside} else {b.F}(0.0))"),
                            add=True)


# ---- im2col / col2im: a convolution as one GEMM ----------------------------------------------
_WINDOW_ATTRS = {"kernel": Attr("ints"), **_PAIR}


def _im2col_infer(x: TensorType, *, kernel, stride, padding, dilation) -> TensorType:
    _image("im2col", "input", x)
    _pairs("im2col", kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    oh, ow = _spatial("im2col", x, kernel, stride, padding, dilation)
    return TensorType(x.dtype, (x.shape[0], oh * ow, x.shape[1] * kernel[0] * kernel[1]))


def _col2im_infer(g: TensorType, *, kernel, stride, padding, dilation, size) -> TensorType:
    require_rank("col2im", "columns", g, 3, hint="columns are [N, OH·OW, C·KH·KW] (im2col's result)")
    same_dtype("col2im", g, allowed=FLOATS)
    k = kernel[0] * kernel[1] if len(kernel) == 2 else 0
    if len(size) != 3 or not k or isinstance(g.shape[2], str) or g.shape[2] % k:
        raise ShapeError(f"col2im: columns {g} do not fit kernel {list(kernel)} and size {list(size)} (C, H, W)")
    x = TensorType(g.dtype, (g.shape[0], *size))
    if _im2col_infer(x, kernel=kernel, stride=stride, padding=padding, dilation=dilation) != g:
        raise ShapeError(f"col2im: columns {g} are not im2col's of {x}")
    return x


def im2col_ref(x, *, kernel, stride, padding, dilation):
    out = [out_size(x.shape[2 + a], kernel[a], stride[a], padding[a], dilation[a]) for a in range(2)]
    win = _windows(_pad(x, padding), kernel, stride, dilation, out)  # [N, C, KH, KW, OH, OW]
    return np.ascontiguousarray(win.transpose(0, 4, 5, 1, 2, 3)).reshape(x.shape[0], out[0] * out[1], -1)


def col2im_ref(g, *, kernel, stride, padding, dilation, size):
    c, h, w = size
    out = [out_size((h, w)[a], kernel[a], stride[a], padding[a], dilation[a]) for a in range(2)]
    cols = g.astype(np.float64).reshape(g.shape[0], *out, c, *kernel)
    ph, pw = padding
    dxp = np.zeros((g.shape[0], c, h + 2 * ph, w + 2 * pw))
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            h0, w0 = i * dilation[0], j * dilation[1]
            dxp[:, :, h0:h0 + stride[0] * (out[0] - 1) + 1:stride[0], w0:w0 + stride[1] * (out[1] - 1) + 1:stride[1]] \
                += cols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(dxp[:, :, ph:ph + h, pw:pw + w]).astype(g.dtype)


def _im2col_nest(b, n):
    (x,), cols, a = n.inputs, n.outputs[0], n.attrs
    (kh_, kw_), c_all = a["kernel"], x.type.shape[1]
    oh_, ow_ = (out_size(x.type.shape[2 + i], a["kernel"][i], a["stride"][i], a["padding"][i], a["dilation"][i])
                for i in range(2))
    src = _padded(b, x, a["padding"])
    with b.loop([x.type.shape[0], oh_, ow_]) as (i_n, oh, ow):
        with b.loop([c_all, kh_, kw_], names="k") as (c, kh, kw):
            v = b.load(src, _tap(b, i_n, c, oh, ow, kh, kw, a), "xv")
            b.store(cols, [i_n, b.at(ow, 1, f"{oh} * {ow_}"), b.at(kw, 1, f"{c} * {kh_ * kw_} + {kh} * {kw_}")], v)


def _col2im_nest(b, n):
    """At stride 1, a gather: each pixel sums the column elements that read it (an index clamp
    and a select where the window position leaves the output), stored once, in parallel.
    Otherwise a scatter: each column element added into the (padded) pixel im2col read it from."""
    (g,), dx, a = n.inputs, n.outputs[0], n.attrs
    (kh_, kw_), (ph, pw), (dh, dw) = a["kernel"], a["padding"], a["dilation"]
    nb, c_all, h, w = dx.type.shape
    oh_, ow_ = (out_size((h, w)[i], a["kernel"][i], a["stride"][i], a["padding"][i], a["dilation"][i])
                for i in range(2))
    if tuple(a["stride"]) == (1, 1):
        with b.loop(dx.type.shape) as (i_n, c, y, x):
            with b.loop(a["kernel"], names="k") as (kh, kw):
                oh, ow = b.let(f"{y} + {ph} - {kh} * {dh}", "oh"), b.let(f"{x} + {pw} - {kw} * {dw}", "ow")
                inside = b.let(f"{oh} >= 0 and {oh} < {oh_} and {ow} >= 0 and {ow} < {ow_}", "inside")
                p = b.let(f"min(max({oh}, 0), {oh_ - 1}) * {ow_} + min(max({ow}, 0), {ow_ - 1})", "p")
                v = b.load(g, [i_n, b.via(p), b.at(kw, 1, f"{c} * {kh_ * kw_} + {kh} * {kw_}")], "gv")
                acc = b.accumulate("sum", b.let(f"({v} if {inside} else {b.F}(0.0))", "gs"))
            b.store(dx, [i_n, c, y, x], acc)
        return
    if ph or pw:
        dst = b.scratch([nb, c_all, h + 2 * ph, w + 2 * pw], dx.type.dtype, f"{b.F}(0.0)", "dxpad")
    else:
        b.fill(dx, f"{b.F}(0.0)")
        dst = dx
    with b.loop([nb]) as (i_n,):
        with b.loop([oh_, ow_, c_all, kh_, kw_], independent=False, names="o") as (oh, ow, c, kh, kw):
            v = b.load(g, [i_n, b.at(ow, 1, f"{oh} * {ow_}"), b.at(kw, 1, f"{c} * {kh_ * kw_} + {kh} * {kw_}")], "gv")
            b.store(dst, _tap(b, i_n, c, oh, ow, kh, kw, a), v, add=True)
    if dst is not dx:
        with b.loop(dx.type.shape) as i:
            b.store(dx, i, b.load(dst, [i[0], i[1], b.at(i[2], 1, ph), b.at(i[3], 1, pw)]))


def _window_attrs(ctx) -> dict:
    return {k: ctx.attrs[k] for k in _WINDOW_ATTRS}


register(OpDef("im2col", "structured", _im2col_infer, im2col_ref, arity=1, attrs=_WINDOW_ATTRS,
               doc="the windows of NCHW images as rows: [N, OH·OW, C·KH·KW] (zero padding), so that a "
                   "convolution is one GEMM with the weight reshaped to [O, C·KH·KW]",
               vjp=lambda ctx, g: [ctx.emit("col2im", g, rule="each window element's gradient added back to "
                                            "its pixel", size=list(ctx.inputs[0].type.shape[1:]),
                                            **_window_attrs(ctx))],
               role="layout", lowering={"nest": _im2col_nest}))
register(OpDef("col2im", "structured", _col2im_infer, col2im_ref, arity=1,
               attrs={**_WINDOW_ATTRS, "size": Attr("ints")},
               doc="the transpose of im2col: columns summed back into [N, C, H, W] images; size: (C, H, W)",
               vjp=lambda ctx, g: [ctx.emit("im2col", g, rule="the windows of g", **_window_attrs(ctx))],
               lowering={"nest": _col2im_nest}))


# ---- the records -------------------------------------------------------------------------
register(OpDef("conv2d", "structured", _conv_infer, conv2d_ref, arity=2, attrs=_CONV_ATTRS,
               doc="2-D cross-correlation of NCHW images with OIHW weights (PyTorch's conv2d without bias)",
               vjp=_conv_vjp, role="layout", lowering={"nest": _conv_nest}))
register(OpDef("conv2d_grad_input", "structured", _conv_grad_input_infer, conv2d_grad_input_ref, arity=2,
               attrs={**_CONV_ATTRS, "size": Attr("ints")}, nondiff=_BACKWARD_OP,
               doc="the backward of conv2d to its input (a transposed convolution); size: the input's (H, W)",
               lowering={"nest": _conv_grad_input_nest}))
register(OpDef("conv2d_grad_weight", "structured", _conv_grad_weight_infer, conv2d_grad_weight_ref, arity=2,
               attrs={**_CONV_ATTRS, "kernel": Attr("ints")}, nondiff=_BACKWARD_OP,
               doc="the backward of conv2d to its weight: Σ over the batch and positions of g times the window",
               lowering={"nest": _conv_grad_weight_nest}))
register(OpDef("max_pool2d", "structured", _pool_infer("max_pool2d"), max_pool2d_ref, arity=1, attrs=_POOL_ATTRS,
               doc="the maximum of each window of NCHW images (padding counts as -inf; NaN propagates)",
               vjp=_max_pool_vjp, role="layout", lowering={"nest": _max_pool_nest}))
register(OpDef("max_pool2d_grad", "structured", _max_pool_grad_infer, max_pool2d_grad_ref, arity=2,
               attrs=_POOL_ATTRS, nondiff=_BACKWARD_OP,
               doc="the backward of max_pool2d: each window's gradient to its first maximal element (PyTorch's)",
               lowering={"nest": _max_pool_grad_nest}))
register(OpDef("avg_pool2d", "structured", _pool_infer("avg_pool2d"), avg_pool2d_ref, arity=1, attrs=_AVG_ATTRS,
               doc="the mean of each window of NCHW images (padding counts as 0 and in the divisor unless "
                   "count_include_pad is false)", vjp=_avg_pool_vjp, role="layout", lowering={"nest": _avg_pool_nest}))
register(OpDef("avg_pool2d_grad", "structured", _avg_pool_grad_infer, avg_pool2d_grad_ref, arity=1,
               attrs={**_AVG_ATTRS, "size": Attr("ints")}, nondiff=_BACKWARD_OP,
               doc="the backward of avg_pool2d: g divided among its window's elements; size: the input's (H, W)",
               lowering={"nest": _avg_pool_grad_nest}))
