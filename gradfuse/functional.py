"""The functional layer of the DSL: one function per user-level operation, recorded as IR.

These functions only run while a model is being traced (see :func:`gradfuse.trace`); Python
numbers mix freely with tensors and become constants of the tensor's dtype.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Sequence

from gradfuse.errors import ShapeError
from gradfuse.ir.registry import get_op
from gradfuse.ir.types import DType
from gradfuse.tensor import Tensor
from gradfuse.tracing import current


def _emit(op: str, *inputs: Tensor, hint: str | None = None, **attrs) -> Tensor:
    (out,) = current().emit(op, [_lift(t).value for t in inputs], attrs, hint=hint)
    return Tensor(out)


def _lift(x, like: Tensor | None = None) -> Tensor:
    """A Tensor from a Tensor or a Python number (as a constant of ``like``'s dtype)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, bool | int | float):
        dtype = like.dtype if like is not None else DType.f32
        if not dtype.is_float and float(x) != int(x):
            raise current().error(f"the number {x} would be truncated to fit {like.type}",
                                  hint="cast the tensor first: x.astype('f32')")
        return Tensor(current().const(x, dtype))
    raise current().error(f"cannot use a {type(x).__name__} in a traced model",
                          hint="pass data as a model input, or store it as a parameter or buffer")


def _pair(a, b) -> tuple[Tensor, Tensor]:
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
    return _lift(a, like), _lift(b, like)


def _binary(op: str):
    def fn(a, b) -> Tensor:
        return _emit(op, *_pair(a, b))

    fn.__name__ = op
    fn.__doc__ = f"Elementwise ``{op}`` with numpy broadcasting."
    return fn


add, sub, mul, div, pow = (_binary(o) for o in ("add", "sub", "mul", "div", "pow"))
maximum, minimum = _binary("maximum"), _binary("minimum")
eq, ne, lt, le, gt, ge = (_binary(o) for o in ("eq", "ne", "lt", "le", "gt", "ge"))
logical_and, logical_or = _binary("logical_and"), _binary("logical_or")


def _unary(op: str):
    def fn(x: Tensor) -> Tensor:
        return _emit(op, _lift(x))

    fn.__name__ = op
    fn.__doc__ = f"Elementwise ``{op}``."
    return fn


neg, abs, exp, log, sqrt, rsqrt = (_unary(o) for o in ("neg", "abs", "exp", "log", "sqrt", "rsqrt"))
tanh, erf, sigmoid, relu, logical_not = (_unary(o) for o in ("tanh", "erf", "sigmoid", "relu", "logical_not"))


def leaky_relu(x: Tensor, alpha: float = 0.01) -> Tensor:
    return _emit("leaky_relu", x, alpha=alpha)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU, exact (``approximate="none"``, with erf) or the tanh approximation."""
    return _emit("gelu", x, approximate=approximate)


def where(cond: Tensor, a, b) -> Tensor:
    a, b = _pair(a, b)
    return _emit("where", cond, a, b)


def cast(x: Tensor, dtype) -> Tensor:
    return _emit("cast", x, dtype=DType.of(dtype))


# ---- reductions --------------------------------------------------------------------------
def _axes(x: Tensor, axis) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -x.ndim <= a < x.ndim:
            raise current().error(f"axis {a} is out of range for {x.type}")
        out.append(a % x.ndim)
    if len(set(out)) != len(out):
        raise current().error(f"axis {axis} repeats an axis of {x.type}")
    return tuple(sorted(out))


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return _emit("sum", x, axes=_axes(x, axis), keepdims=keepdims)


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return _emit("mean", x, axes=_axes(x, axis), keepdims=keepdims)


def max(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return _emit("max", x, axes=_axes(x, axis), keepdims=keepdims)


# ---- shapes ------------------------------------------------------------------------------
def _shape_arg(shape) -> list:
    return list(shape[0]) if len(shape) == 1 and isinstance(shape[0], list | tuple) else list(shape)


def reshape(x: Tensor, *shape) -> Tensor:
    """Reshape; one entry may be -1 (inferred), and symbols such as ``"N"`` may appear."""
    shape = _shape_arg(shape)
    if shape.count(-1) > 1:
        raise current().error(f"reshape to {shape}: only one dimension can be -1")
    if -1 in shape:
        from collections import Counter

        from gradfuse.ir.types import dim_factors, dim_product

        def factors(dims):
            syms, k = Counter(), 1
            for d in dims:
                s, f = dim_factors(d)
                syms.update(s)
                k *= f
            return syms, k

        (sym_in, rest_in), (sym_out, rest_out) = factors(x.shape), factors(d for d in shape if d != -1)
        if sym_out - sym_in or rest_out == 0 or rest_in % rest_out:
            raise current().error(f"cannot reshape {x.type} to {shape}: the element counts cannot match",
                                  hint="-1 takes what the other dimensions leave, symbols (N) included")
        shape[shape.index(-1)] = dim_product((sym_in - sym_out).elements(), rest_in // rest_out)
    return _emit("reshape", x, shape=shape)


def flatten(x: Tensor, start: int = 1) -> Tensor:
    """Merge axes ``start..`` into one: f32[N,8,8] -> f32[N,64]."""
    return reshape(x, *x.shape[:start], -1)


def transpose(x: Tensor, *perm) -> Tensor:
    perm = _shape_arg(perm) or list(reversed(range(x.ndim)))
    return _emit("transpose", x, perm=[p % x.ndim for p in perm])


def broadcast_to(x: Tensor, shape) -> Tensor:
    return _emit("broadcast_to", x, shape=list(shape))


def slice_axis(x: Tensor, axis: int, start: int | None, stop: int | None, step: int | None = None) -> Tensor:
    axis = _axes(x, axis)[0]
    size = x.shape[axis]
    if isinstance(size, str):
        raise current().error(f"cannot slice the batch axis {size} of {x.type}")
    if step is not None and step < 1:
        raise current().error(f"slice step must be positive, got {step}")
    start, stop, step = builtins.slice(start, stop, step).indices(size)
    stop = builtins.max(start, stop)
    return _emit("slice", x, axis=axis, start=start, stop=stop, step=step)


def index(x: Tensor, key) -> Tensor:
    """``x[...]`` with slices and integers (an integer drops its axis)."""
    key = key if isinstance(key, tuple) else (key,)
    if builtins.sum(k is Ellipsis for k in key) > 1:
        raise current().error("an index can hold at most one '...'")
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (builtins.slice(None),) * (x.ndim - len(key) + 1) + key[i + 1:]
    if len(key) > x.ndim:
        raise current().error(f"too many indices ({len(key)}) for {x.type}")
    out, dropped = x, []
    for axis, k in enumerate(key):
        if isinstance(k, builtins.slice):
            if k != builtins.slice(None):
                out = slice_axis(out, axis, k.start, k.stop, k.step)
        elif isinstance(k, int):
            size = x.shape[axis]
            if isinstance(size, str):
                raise current().error(f"cannot index the batch axis {size} of {x.type}",
                                      hint="a compiled model works on whole batches; index feature axes")
            if not -size <= k < size:
                raise current().error(f"index {k} is out of range for axis {axis} of {x.type}")
            out = slice_axis(out, axis, k % size, k % size + 1)
            dropped.append(axis)
        else:
            raise current().error(f"unsupported index {k!r}: use slices and integers")
    if dropped:
        out = reshape(out, *[d for i, d in enumerate(out.shape) if i not in dropped])
    return out


def concat(xs: Sequence[Tensor], axis: int = -1) -> Tensor:
    if not xs:
        raise current().error("concat needs at least one tensor")
    return _emit("concat", *xs, axis=_axes(xs[0], axis)[0])


# ---- linear algebra ----------------------------------------------------------------------
def matmul(a: Tensor, b: Tensor, transpose_a: bool = False, transpose_b: bool = False) -> Tensor:
    return _emit("matmul", a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight + bias`` with weight of shape [in, out]."""
    y = matmul(x, weight)
    return y + bias if bias is not None else y


# ---- neural-network ops ------------------------------------------------------------------
def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return _emit("softmax", x, axis=_axes(x, axis)[0])


def causal_mask(queries, keys=None) -> Tensor:
    """bool[queries, keys], true where query i may see key j (j <= i; PyTorch's ``is_causal``).
    The sizes may be symbols (``"T"``)."""
    keys = queries if keys is None else keys
    for d in (queries, keys):
        if isinstance(d, bool) or not isinstance(d, int | str) or isinstance(d, int) and d < 1:
            raise current().error(f"causal_mask: a size must be a positive int or a symbol, got {d!r}")
    return _emit("causal_mask", shape=[queries, keys])


def masked_softmax(x: Tensor, mask: Tensor, axis: int = -1) -> Tensor:
    """softmax of ``x`` with the positions where ``mask`` is false set to -inf first (weight 0).

    The ``where`` runs in the softmax row kernel's prologue (``gradfuse show --stage loops``); a
    row with no true position gives NaN, as in PyTorch."""
    if mask.dtype != DType.bool:
        raise current().error(f"softmax mask must be bool (true = keep), got {mask.type}",
                              hint="build it with comparisons, e.g. ids != pad, or F.causal_mask(T)")
    return softmax(where(mask, x, -math.inf), axis)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                                 causal: bool = False, scale: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v over the last two axes (q [..., Tq, d], k [..., Tk, d], v [..., Tk, dv]),
    as ``torch.nn.functional.scaled_dot_product_attention``: ``scale`` defaults to 1/sqrt(d);
    ``mask`` is bool (true = attend) broadcasting to [..., Tq, Tk]; ``causal`` lets query i see
    keys j <= i (and combines with ``mask``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim < 2:
            raise current().error(f"scaled_dot_product_attention: {name} must have at least 2 axes, got {t.type}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise current().error(f"scaled_dot_product_attention: q {q.type}, k {k.type}, v {v.type} do not match",
                              hint="q [..., Tq, d], k [..., Tk, d], v [..., Tk, dv]")
    d = q.shape[-1]
    scores = matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(d) if scale is None else scale)
    keep = mask
    if causal:
        causal = causal_mask(q.shape[-2], k.shape[-2])
        keep = causal if keep is None else logical_and(keep, causal)
    weights = softmax(scores, -1) if keep is None else masked_softmax(scores, keep, -1)
    return matmul(weights, v)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return _emit("log_softmax", x, axis=_axes(x, axis)[0])


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean softmax cross-entropy of ``logits`` against integer class ``labels``."""
    return _emit("softmax_cross_entropy", logits, labels, hint="loss")


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element."""
    return _emit("mse", pred, target, hint="loss")


def layer_norm(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    return _emit("layer_norm", x, gamma, beta, eps=eps)


def _hw(name: str, value) -> list[int]:
    """An int or an (height, width) pair, as PyTorch takes ``kernel_size``, ``stride``, ..."""
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise current().error(f"{name}={value!r} should be an int or a pair of ints (height, width)")
    return pair


def _images(x: Tensor, what: str) -> None:
    if x.ndim != 4:
        raise current().error(f"{what} takes NCHW images [N, C, H, W], got {x.type}",
                              "reshape first, e.g. x.reshape(-1, 1, 8, 8) for 8x8 single-channel images")


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1, method: str = "auto") -> Tensor:
    """PyTorch's ``conv2d``: x [N, C, H, W], weight [O, C/groups, KH, KW], bias [O].

    ``method``: ``"gemm"`` writes it as im2col (the windows as rows [N, OH·OW, C·KH·KW]), one GEMM
    with the weight as [O, C·KH·KW] (the bias added in its epilogue) and a transpose to NCHW (where
    an activation fuses); its backward is two GEMMs and col2im, from those ops' own rules. ``"direct"`` is the
    conv2d op, one loop nest (and its backward ops). ``"auto"``: gemm without groups (the digits
    CNN's training step measured 5x faster so), direct with them."""
    _images(x, "conv2d")
    attrs = {"stride": _hw("stride", stride), "padding": _hw("padding", padding), "dilation": _hw("dilation", dilation)}
    if method not in ("auto", "gemm", "direct"):
        raise current().error(f"conv2d: method={method!r} should be 'auto', 'gemm' or 'direct'")
    if method == "gemm" and groups != 1:
        raise current().error(f"conv2d: method='gemm' takes groups=1, got groups={groups}", "use method='direct'")
    if method == "direct" or groups != 1 or weight.ndim != 4 or weight.shape[1] != x.shape[1]:
        y = _emit("conv2d", x, weight, groups=groups, **attrs)  # (its shape rule explains a mismatch)
    else:
        try:  # conv2d's shape rule, so that a mismatch is explained in conv2d's terms
            get_op("conv2d").infer(x.type, weight.type, groups=groups, **attrs)
        except ShapeError as e:
            raise e.located(current().where()) from None
        o, c, kh, kw = weight.shape
        cols = _emit("im2col", x, kernel=[kh, kw], **attrs)
        rows = matmul(cols, reshape(weight, o, c * kh * kw), transpose_b=True)  # [N, OH·OW, O]
        if bias is not None:  # along the rows: the GEMM's epilogue, and its gradient a sum over leading axes
            rows = rows + bias
        oh, ow = (_conv_size(x.shape[2 + a], (kh, kw)[a], *(attrs[k][a] for k in ("stride", "padding", "dilation")))
                  for a in range(2))
        return transpose(reshape(rows, x.shape[0], oh, ow, o), 0, 3, 1, 2)
    return y + reshape(bias, bias.shape[0], 1, 1) if bias is not None else y


def _conv_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    """The maximum of each window (stride defaults to the kernel size, as PyTorch's)."""
    _images(x, "max_pool2d")
    kernel = _hw("kernel_size", kernel_size)
    return _emit("max_pool2d", x, kernel=kernel, stride=kernel if stride is None else _hw("stride", stride),
                 padding=_hw("padding", padding))


def avg_pool2d(x: Tensor, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> Tensor:
    """The mean of each window (padding counts in the divisor unless ``count_include_pad=False``)."""
    _images(x, "avg_pool2d")
    kernel = _hw("kernel_size", kernel_size)
    return _emit("avg_pool2d", x, kernel=kernel, stride=kernel if stride is None else _hw("stride", stride),
                 padding=_hw("padding", padding), count_include_pad=count_include_pad)


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    return _emit("embedding", table, ids)


def dropout(x: Tensor, p: float) -> Tensor:
    """In training, zero each element with probability ``p`` and scale the rest by 1/(1-p);
    at inference, the identity. Masks come from a counter-based hash (see ir/ops/random.py)."""
    t = current()
    if not t.train or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise t.error(f"dropout probability must be in [0, 1), got {p}")
    stream = t.dropout_streams
    t.dropout_streams += 1
    (out,) = t.emit("dropout", [x.value, t.dropout_step()], {"p": p, "seed": t.seed, "stream": stream})
    return Tensor(out)


def training() -> bool:
    """Whether the model is being traced for training (dropout on, batch statistics)."""
    return current().train


def check_input(x: Tensor, what: str, last_dim: int | None = None, rank: int | None = None,
                hint: str | None = None) -> None:
    """Raise a located ShapeError unless ``x`` has the given rank / last dimension."""
    if (rank is not None and x.ndim != rank) or (last_dim is not None and (x.ndim == 0 or x.shape[-1] != last_dim)):
        raise current().error(f"{what} got {x.type}", hint)


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("builtins", "math", "Sequence",
                                                                   "GradfuseError", "annotations")]
