"""Layers in the style people know from PyTorch, traced into IR.

A Module holds structure and initialisers, not numbers: the initial values come from
:meth:`Module.initial_values` (reproducible from a seed, independent of construction order),
and the compiled program owns the live weights.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from gradfuse import functional as F
from gradfuse.ir.graph import ArgKind
from gradfuse.ir.types import DType
from gradfuse.tensor import Tensor
from gradfuse.tracing import current, is_tracing

if TYPE_CHECKING:
    from gradfuse.state_dict import StateView

Init = Callable[[tuple[int, ...], np.random.Generator], np.ndarray]


def he_normal(fan_in: int) -> Init:
    """N(0, 2/fan_in): keeps ReLU activations' variance steady through depth (He et al. 2015)."""
    return lambda shape, rng: rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)


def xavier_uniform(fan_in: int, fan_out: int) -> Init:
    """U(±sqrt(6/(fan_in+fan_out))): for tanh/sigmoid/linear layers (Glorot & Bengio 2010)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return lambda shape, rng: rng.uniform(-bound, bound, shape)


def constant(value: float) -> Init:
    return lambda shape, rng: np.full(shape, value)


def normal(std: float) -> Init:
    return lambda shape, rng: rng.normal(0.0, std, shape)


class Parameter:
    """A trained tensor: shape, dtype and initialiser. Becomes a ``param`` graph argument."""

    kind = ArgKind.param

    def __init__(self, shape, init: Init | np.ndarray, dtype: DType = DType.f32):
        self.shape = tuple(shape)
        self.init = init
        self.dtype = DType.of(dtype)

    def initial_value(self, rng: np.random.Generator) -> np.ndarray:
        value = np.asarray(self.init(self.shape, rng) if callable(self.init) else self.init)
        assert value.shape == self.shape, (value.shape, self.shape)
        return value.astype(self.dtype.np)


class Buffer(Parameter):
    """A tensor the model carries but does not train (running statistics, encoding tables):
    a ``state`` graph argument."""

    kind = ArgKind.state


class Module:
    """Base class of layers. Assign Parameters, Buffers and Modules as attributes; write
    ``forward``. Calling a module inside a trace records its ops under its name."""

    _path = ""

    def __setattr__(self, name, value):
        if isinstance(value, Parameter | Module):
            self.__dict__.setdefault("_children", {})[name] = value
        object.__setattr__(self, name, value)

    def children(self) -> dict[str, Parameter | Module]:
        return self.__dict__.get("_children", {})

    def named_modules(self, prefix: str = "", _seen=None) -> Iterator[tuple[str, Module]]:
        """This module and its descendants by dotted path; a module reachable twice (shared
        weights) is listed once, under its first path."""
        seen = _seen if _seen is not None else set()
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, child in self.children().items():
            if isinstance(child, Module):
                yield from child.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def named_tensors(self) -> Iterator[tuple[str, Parameter]]:
        """Every Parameter and Buffer, by dotted path (``fc1.weight``), in definition order."""
        for path, module in self.named_modules():
            for name, child in module.children().items():
                if isinstance(child, Parameter):
                    yield (f"{path}.{name}" if path else name), child

    def initial_values(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Initial parameter and buffer values; each tensor's random stream depends only on
        the seed and its path, so adding a layer does not change the others' values."""
        return {path: p.initial_value(np.random.default_rng([seed, zlib.crc32(path.encode())]))
                for path, p in self.named_tensors()}

    def extra_repr(self) -> str:
        return ""

    # ---- PyTorch's state_dict (see gradfuse/pytorch.py); each layer maps its own tensors ----
    def state_from_pytorch(self, src: StateView) -> dict[str, np.ndarray]:
        """This module's tensors, by path relative to it, from ``src``: the entries of its PyTorch
        counterpart's ``state_dict()`` under its prefix. The default is what matches PyTorch's
        naming: every Parameter and Buffer under its attribute name and in the same layout,
        every child module under its attribute name (a Sequential's ``0``, ``1``, ... as in
        PyTorch). Layers whose PyTorch counterpart differs (Linear, BatchNorm,
        MultiHeadSelfAttention, ...) override this."""
        return self._same_layout(src, "state_from_pytorch")

    def state_to_pytorch(self, src: StateView) -> dict[str, np.ndarray]:
        """The inverse of :meth:`state_from_pytorch`: ``src`` holds gradfuse's entries under
        this module's prefix; returns the PyTorch counterpart's, by path relative to it."""
        return self._same_layout(src, "state_to_pytorch")

    def _same_layout(self, src: StateView, method: str) -> dict[str, np.ndarray]:
        """Tensors under their attribute names as they are; children mapped by their ``method``."""
        out: dict[str, np.ndarray] = {}
        for name, child in self.children().items():
            if isinstance(child, Parameter):
                value = src.take(name, child.shape)
                if value is not None:
                    out[name] = value
            else:
                out.update((f"{name}.{k}", v) for k, v in getattr(child, method)(src.sub(name)).items())
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def forward(self, *args):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        tracer = current()
        with tracer.layer(self._path, repr(self)):
            out = self.forward(*args, **kwargs)
        last = tracer.builder.nodes[-1] if tracer.builder.nodes else None
        if isinstance(out, Tensor) and self._path and last is not None and out.value is last.outputs[0] \
                and last.scope == self._path:  # made by this layer itself, not by a sublayer already named
            tracer.builder.rename(out.value, self._path, fresh=True)  # %fc1, or %fc1.1 when called again
        return out

    def tensor(self, name: str) -> Tensor:
        """The traced value of one of this module's parameters or buffers."""
        return current().tensors[f"{self._path}.{name}" if self._path else name]

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if isinstance(value, Parameter) and is_tracing():
            return object.__getattribute__(self, "tensor")(name)
        return value


# ---- layers ------------------------------------------------------------------------------
class Linear(Module):
    """``y = x @ weight + bias`` with weight [in, out], He-initialised (``init="xavier"`` for
    tanh/sigmoid nets); the bias starts at zero."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: str = "he"):
        self.in_features, self.out_features = in_features, out_features
        inits = {"he": he_normal(in_features), "xavier": xavier_uniform(in_features, out_features)}
        if init not in inits:
            raise ValueError(f"Linear init must be 'he' or 'xavier', not {init!r}")
        self.weight = Parameter((in_features, out_features), inits[init])
        self.use_bias = bias
        if bias:
            self.bias = Parameter((out_features,), constant(0.0))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}" + ("" if self.use_bias else ", bias=False")

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x.shape[-1] != self.in_features:
            hint = "flatten first?" if x.ndim > 2 and x.shape[-1] != self.in_features else \
                f"the previous layer gives {x.shape[-1] if x.ndim else 'a scalar'} features"
            raise current().error(f"{self!r} got {x.type}, expected last dimension {self.in_features}", hint)
        return F.linear(x, self.weight, self.bias if self.use_bias else None)

    def state_from_pytorch(self, src: StateView) -> dict[str, np.ndarray]:
        """``torch.nn.Linear(in, out)`` computes ``x Wᵀ + b`` with weight [out, in]: transposed
        here to gradfuse's [in, out]; the bias is the same."""
        out = {}
        w = src.take("weight", (self.out_features, self.in_features))
        if w is not None:
            out["weight"] = np.ascontiguousarray(w.T)
        if self.use_bias and (b := src.take("bias", (self.out_features,))) is not None:
            out["bias"] = b
        return out

    def state_to_pytorch(self, src: StateView) -> dict[str, np.ndarray]:
        out = {}
        w = src.take("weight", (self.in_features, self.out_features))
        if w is not None:
            out["weight"] = np.ascontiguousarray(w.T)
        if self.use_bias and (b := src.take("bias", (self.out_features,))) is not None:
            out["bias"] = b
        return out


class _Activation(Module):
    fn: Callable[[Tensor], Tensor]

    def forward(self, x: Tensor) -> Tensor:
        return type(self).fn(x)


class ReLU(_Activation):
    fn = staticmethod(F.relu)


class Sigmoid(_Activation):
    fn = staticmethod(F.sigmoid)


class Tanh(_Activation):
    fn = staticmethod(F.tanh)


class LeakyReLU(Module):
    def __init__(self, alpha: float = 0.01):
        self.alpha = alpha

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def forward(self, x):
        return F.leaky_relu(x, self.alpha)


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        self.approximate = approximate

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}" if self.approximate != "none" else ""

    def forward(self, x):
        return F.gelu(x, self.approximate)


class Softmax(Module):
    def __init__(self, axis: int = -1):
        self.axis = axis

    def forward(self, x):
        return F.softmax(x, self.axis)


class Flatten(Module):
    """Merge the axes from ``start`` (PyTorch's ``start_dim``) on: [N, C, H, W] -> [N, C·H·W]."""

    def __init__(self, start: int = 1, *, start_dim: int | None = None):
        self.start = start if start_dim is None else start_dim

    def forward(self, x):
        return F.flatten(x, self.start)


class Sequential(Module):
    """Apply layers in order; they are named ``0``, ``1``, ... like PyTorch's."""

    def __init__(self, *layers: Module):
        self.layers = list(layers)
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def extra_repr(self) -> str:
        return ", ".join(type(m).__name__ for m in self.layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Residual(Module):
    """``x + block(x)``: the skip connection of residual networks."""

    def __init__(self, block: Module):
        self.block = block

    def extra_repr(self) -> str:
        return repr(self.block)

    def forward(self, x):
        y = self.block(x)
        if y.shape != x.shape:
            raise current().error(f"Residual block maps {x.type} to {y.type}; a skip connection needs "
                                  "the same shape", "make the block's last layer output the input width")
        return x + y


class LayerNorm(Module):
    """Normalise over the trailing axes ``normalized_shape`` (an int: the last axis), then scale
    (``weight``) and shift (``bias``) of that shape: PyTorch's ``LayerNorm(normalized_shape)``,
    whose state_dict has the same names and layout. Over several axes, the layer_norm op runs on
    the input with those axes merged (a reshape, which is free)."""

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"LayerNorm: normalized_shape {normalized_shape!r} should be a positive int or "
                             "a tuple of them")
        self.normalized_shape, self.eps = shape, eps
        self.features = math.prod(shape)
        self.weight = Parameter(shape, constant(1.0))
        self.bias = Parameter(shape, constant(0.0))

    def extra_repr(self) -> str:
        return str(self.features) if len(self.normalized_shape) == 1 else str(self.normalized_shape)

    def forward(self, x):
        k = len(self.normalized_shape)
        if k == 1:
            F.check_input(x, repr(self), last_dim=self.features)
            return F.layer_norm(x, self.weight, self.bias, self.eps)
        if x.ndim <= k or tuple(x.shape[-k:]) != self.normalized_shape:
            raise current().error(f"{self!r} got {x.type}, expected trailing dimensions {list(self.normalized_shape)}",
                                  "normalized_shape lists the last axes of the input")
        lead = list(x.shape[:-k])
        y = F.layer_norm(x.reshape(*lead, self.features), self.weight.reshape(self.features),
                         self.bias.reshape(self.features), self.eps)
        return y.reshape(*lead, *self.normalized_shape)


class BatchNorm(Module):
    """Normalise each feature (last axis) over the batch in training, with running statistics
    at inference; the running statistics are state updated by the training graph.

    PyTorch's ``BatchNorm1d(features)`` on [N, features] inputs computes the same (momentum
    0.1 with the same convention, eps 1e-5, biased variance to normalise, unbiased in the running
    variance); on [N, C, L] inputs it normalises axis 1, where this layer takes [..., features]."""

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5):
        self.features, self.momentum, self.eps = features, momentum, eps
        self.weight = Parameter((features,), constant(1.0))
        self.bias = Parameter((features,), constant(0.0))
        self.running_mean = Buffer((features,), constant(0.0))
        self.running_var = Buffer((features,), constant(1.0))

    def extra_repr(self) -> str:
        return str(self.features)

    def forward(self, x):
        F.check_input(x, repr(self), last_dim=self.features)
        return self._normalize(x)

    def _normalize(self, x):
        """batch_norm_train (or _infer) over the last axis of ``x``."""
        t = current()
        args = [x.value, self.weight.value, self.bias.value, self.running_mean.value, self.running_var.value]
        if not t.train:
            (y,) = t.emit("batch_norm_infer", args, {"eps": self.eps})
            return Tensor(y)
        y, mean, var = t.emit("batch_norm_train", args, {"momentum": self.momentum, "eps": self.eps})
        t.updates += [(self.running_mean.value, mean), (self.running_var.value, var)]
        return Tensor(y)

    def state_from_pytorch(self, src: StateView) -> dict[str, np.ndarray]:
        """``weight``, ``bias``, ``running_mean``, ``running_var`` as in ``torch.nn.BatchNorm1d``;
        its ``num_batches_tracked`` counter is ignored (it only matters for PyTorch's
        ``momentum=None`` cumulative average, which this layer does not have)."""
        src.ignore("num_batches_tracked")
        return super().state_from_pytorch(src)


class BatchNorm2d(BatchNorm):
    """BatchNorm over the channels (axis 1) of NCHW images, with statistics per channel over
    N, H and W: PyTorch's ``BatchNorm2d(channels)``, same state_dict. Runs the feature-axis
    batch_norm ops on the input transposed to NHWC (and the result transposed back)."""

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.features:
            raise current().error(f"{self!r} got {x.type}, expected NCHW images with {self.features} channels",
                                  "BatchNorm2d(C) follows a Conv2d(..., C, ...); use BatchNorm for [N, features]")
        return self._normalize(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


class Conv2d(Module):
    """PyTorch's ``Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
    bias)`` on NCHW images: weight [out, in/groups, kh, kw] (He-initialised) and bias [out] (zeros),
    the same names and layout as PyTorch's state_dict."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, method: str = "auto"):
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.method = method  # functional.conv2d's: "auto", "gemm" (im2col + GEMM) or "direct" (one loop nest)
        fan_in = in_channels // groups * kh * kw
        self.weight = Parameter((out_channels, in_channels // groups, kh, kw), he_normal(fan_in))
        self.use_bias = bias
        if bias:
            self.bias = Parameter((out_channels,), constant(0.0))

    def extra_repr(self) -> str:
        k = self.kernel_size[0] if self.kernel_size[0] == self.kernel_size[1] else self.kernel_size
        extra = [f"{name}={v}" for name, v, default in (("stride", self.stride, 1), ("padding", self.padding, 0),
                                                        ("dilation", self.dilation, 1), ("groups", self.groups, 1))
                 if v != default]
        return ", ".join([str(self.in_channels), str(self.out_channels), str(k), *extra]
                         + ([] if self.use_bias else ["bias=False"]))

    def forward(self, x):
        if x.ndim != 4:
            raise current().error(f"{self!r} got {x.type}, expected NCHW images [N, {self.in_channels}, H, W]",
                                  f"reshape first: x.reshape(-1, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise current().error(f"{self!r} got {x.type} with {x.shape[1]} channels, expected {self.in_channels}",
                                  "the previous layer's out_channels must be this layer's in_channels")
        return F.conv2d(x, self.weight, self.bias if self.use_bias else None, self.stride, self.padding,
                        self.dilation, self.groups, self.method)


class MaxPool2d(Module):
    """PyTorch's ``MaxPool2d(kernel_size, stride=kernel_size, padding=0)``; the gradient goes to the
    first maximal element of each window, as PyTorch's."""

    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def extra_repr(self) -> str:
        return f"{self.kernel_size}" + (f", stride={self.stride}" if self.stride is not None else "") + \
            (f", padding={self.padding}" if self.padding else "")

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(MaxPool2d):
    """PyTorch's ``AvgPool2d(kernel_size, stride=kernel_size, padding=0, count_include_pad=True)``."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad: bool = True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = count_include_pad

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.count_include_pad)


class Dropout(Module):
    def __init__(self, p: float = 0.5):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout(p={p}): p is the probability of zeroing an element, in [0, 1)")
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x):
        return F.dropout(x, self.p)


class Embedding(Module):
    """Rows of ``weight`` [num_embeddings, dim] picked by integer ids: PyTorch's
    ``Embedding(num_embeddings, dim)``, same name and layout (``padding_idx`` and ``max_norm``
    have no counterpart here)."""

    def __init__(self, num_embeddings: int, dim: int):
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = Parameter((num_embeddings, dim), normal(1.0))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}"

    def forward(self, ids):
        if ids.dtype not in (DType.i32, DType.i64):
            raise current().error(f"{self!r} takes integer ids, got {ids.type}", "cast the ids to i64")
        return F.embedding(ids, self.weight)


def sinusoidal_table(max_len: int, dim: int) -> np.ndarray:
    """The fixed encodings of "Attention Is All You Need": sin/cos at geometric frequencies."""
    pos = np.arange(max_len)[:, None]
    freq = np.exp(-math.log(10000.0) * (np.arange(0, dim, 2) / dim))
    table = np.zeros((max_len, dim))
    table[:, 0::2] = np.sin(pos * freq)
    table[:, 1::2] = np.cos(pos * freq)[:, : dim // 2]
    return table


class _PositionalEncoding(Module):
    def __init__(self, max_len: int, dim: int):
        self.max_len, self.dim = max_len, dim

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, dim={self.dim}"

    def forward(self, x):
        if x.ndim != 3 or x.shape[-1] != self.dim or not isinstance(x.shape[1], int) or x.shape[1] > self.max_len:
            raise current().error(f"{self!r} got {x.type}, expected f32[N,T,{self.dim}] with T <= {self.max_len}")
        return x + self.table[: x.shape[1]]


class SinusoidalPositionalEncoding(_PositionalEncoding):
    """Adds fixed sin/cos position encodings (a non-trained buffer) to x[N,T,D]."""

    def __init__(self, max_len: int, dim: int):
        super().__init__(max_len, dim)
        self.table = Buffer((max_len, dim), sinusoidal_table(max_len, dim))

    def state_from_pytorch(self, src: StateView) -> dict[str, np.ndarray]:
        """The table is a fixed function of its shape (PyTorch models usually register it as a
        non-persistent buffer, absent from their state_dict): taken from ``table`` where the
        state_dict has it, else computed."""
        table = src.take("table", (self.max_len, self.dim), optional=True)
        return {"table": table if table is not None else np.asarray(self.table.init)}

    def state_to_pytorch(self, src: StateView) -> dict[str, np.ndarray]:
        src.take("table", (self.max_len, self.dim), optional=True)
        return {}


class LearnedPositionalEncoding(_PositionalEncoding):
    """Adds a trained position embedding table to x[N,T,D]."""

    def __init__(self, max_len: int, dim: int):
        super().__init__(max_len, dim)
        self.table = Parameter((max_len, dim), normal(0.02))


class MultiHeadSelfAttention(Module):
    """softmax(Q Kᵀ / sqrt(d)) V over ``heads`` heads, for x of shape [N, T, dim].

    The same function as ``torch.nn.MultiheadAttention(dim, heads, batch_first=True)`` called as
    ``attn(x, x, x, need_weights=False)[0]`` (dropout 0): per-head scale 1/sqrt(dim/heads),
    head h the features h·d:(h+1)·d of the projections, heads concatenated before ``out``.

    ``causal=True`` lets position t attend to positions <= t only (PyTorch's ``is_causal``);
    ``forward(x, mask)`` takes a bool mask (true = attend) broadcasting to [N, heads, T, T], e.g.
    ``[N, 1, 1, T]`` for padding. Masked scores become -inf inside the softmax's row kernel."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        if dim % heads:
            raise ValueError(f"MultiHeadSelfAttention: dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.causal = dim, heads, bool(causal)
        self.q = Linear(dim, dim, init="xavier")
        self.k = Linear(dim, dim, init="xavier")
        self.v = Linear(dim, dim, init="xavier")
        self.out = Linear(dim, dim, init="xavier")

    def extra_repr(self) -> str:
        return f"{self.dim}, heads={self.heads}" + (", causal=True" if self.causal else "")

    def forward(self, x, mask=None):
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise current().error(f"{self!r} got {x.type}, expected [N, T, {self.dim}]",
                                  "attention takes a batch of sequences of vectors")
        n, t, _ = x.shape
        head_dim = self.dim // self.heads

        def split(y):  # [N, T, dim] -> [N, heads, T, head_dim]
            return y.reshape(n, t, self.heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        mixed = F.scaled_dot_product_attention(q, k, v, mask=mask, causal=self.causal)
        return self.out(mixed.transpose(0, 2, 1, 3).reshape(n, t, self.dim))

    def state_from_pytorch(self, src: StateView) -> dict[str, np.ndarray]:
        """From ``torch.nn.MultiheadAttention``: ``in_proj_weight`` [3·dim, dim] stacks the q, k
        and v projections' weights (PyTorch's [out, in] layout), ``in_proj_bias`` [3·dim] their
        biases (or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` where PyTorch keeps them
        apart); ``out_proj`` is the ``out`` Linear."""
        d, out = self.dim, {}
        if src.has("q_proj_weight") and not src.has("in_proj_weight"):
            weights = [src.take(f"{n}_proj_weight", (d, d)) for n in "qkv"]
        else:
            w = src.take("in_proj_weight", (3 * d, d))
            weights = np.split(w, 3) if w is not None else [None] * 3
        b = src.take("in_proj_bias", (3 * d,))
        biases = np.split(b, 3) if b is not None else [None] * 3
        for name, w, b in zip("qkv", weights, biases, strict=True):
            if w is not None:
                out[f"{name}.weight"] = np.ascontiguousarray(w.T)
            if b is not None:
                out[f"{name}.bias"] = np.ascontiguousarray(b)
        out.update((f"out.{k}", v) for k, v in self.out.state_from_pytorch(src.sub("out_proj")).items())
        return out

    def state_to_pytorch(self, src: StateView) -> dict[str, np.ndarray]:
        d = self.dim
        ws = [src.take(f"{n}.weight", (d, d)) for n in "qkv"]
        bs = [src.take(f"{n}.bias", (d,)) for n in "qkv"]
        out = {}
        if all(w is not None for w in ws):
            out["in_proj_weight"] = np.concatenate([w.T for w in ws])
        if all(b is not None for b in bs):
            out["in_proj_bias"] = np.concatenate(bs)
        out.update((f"out_proj.{k}", v) for k, v in self.out.state_to_pytorch(src.sub("out")).items())
        return out
