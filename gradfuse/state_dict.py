"""Weights in and out, with PyTorch's semantics: checking a ``state_dict`` against a model.

A state_dict is a mapping from a tensor's dotted path (``fc1.weight``, ``blocks.0.norm.running_mean``:
the attribute path, as :meth:`gradfuse.nn.Module.named_tensors` lists them) to a numpy array.
It holds the parameters and the buffers (BatchNorm's running statistics, fixed tables), never
the optimizer's state — the same contents as PyTorch's ``Module.state_dict()``.

* :meth:`gradfuse.Model.load_state_dict` makes the values the model's initial values (what
  ``gradfuse.compile`` starts from); :meth:`gradfuse.compiler.CompiledModel.state_dict` and
  ``CompiledModel.load_state_dict`` read and write the compiled weights in place.
* dtype: like PyTorch's ``load_state_dict`` (which copies into the existing tensors), any float
  array is accepted for a float tensor and converted to the dtype it is computed in (float64 into an
  f32 model rounds to float32; an f64 compile keeps a Model's float64 values exact). An integer,
  boolean or complex array for a float tensor is refused: that is a mistake, not a conversion.
* Every missing, unexpected and mis-shaped entry is named in one :class:`StateDictError`; where
  the transposed shape would fit, the message says it is probably a PyTorch ``Linear`` weight
  (PyTorch stores them as [out, in], gradfuse as [in, out]) and to convert the state_dict with
  :func:`gradfuse.from_pytorch`. A *square* weight ([64, 64]) cannot be told apart: it loads
  silently in the wrong layout. Load PyTorch weights through ``from_pytorch`` always.

:class:`StateView` is what a layer's PyTorch mapping (``Module.state_from_pytorch``) reads
from: the entries under one module's prefix, recording which were used, missing or mis-shaped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from gradfuse.errors import GradfuseError
from gradfuse.ir.types import DType, TensorType

_PYTORCH_MARKS = ("num_batches_tracked", "in_proj_weight", "in_proj_bias", "out_proj.weight")


class StateDictError(GradfuseError):
    """A state_dict that does not fit a model: the message names every missing, unexpected and
    mis-shaped or mis-typed entry, with the type the model expects."""


class LoadResult(NamedTuple):
    """What ``load_state_dict(..., strict=False)`` skipped (PyTorch returns the same pair)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def to_numpy(value) -> np.ndarray:
    """A numpy copy of an array, a PyTorch tensor (duck-typed: torch is not imported) or a number."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch.Tensor (or look-alike)
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.array(value, copy=True)


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _dtype_name(dtype: np.dtype) -> str:
    try:
        return DType.of(dtype).value
    except TypeError:
        return str(dtype)


def _kind_fits(array: np.ndarray, want: DType) -> bool:
    if want.is_float:
        return array.dtype.kind == "f"
    if want.is_int:
        return array.dtype.kind in "iu"
    return array.dtype.kind == "b"


def check_state(state: Mapping[str, object], expected: Mapping[str, TensorType], *, strict: bool = True,
                what: str = "the model") -> tuple[dict[str, np.ndarray], LoadResult]:
    """Check ``state`` against ``expected`` (name -> type); returns numpy copies of the entries that
    fit (in their own dtype) and what was missing or unexpected. Raises one StateDictError naming
    every problem: with ``strict`` missing and unexpected entries are problems, and a mis-shaped or
    mis-typed entry always is (as in PyTorch)."""
    if not isinstance(state, Mapping):
        raise StateDictError(f"load_state_dict into {what} takes a mapping from names to arrays, "
                             f"got {type(state).__name__}")
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    bad, arrays = [], {}
    for name, want in expected.items():
        if name not in state:
            continue
        try:
            a = to_numpy(state[name])
        except (TypeError, ValueError, RuntimeError) as e:
            bad.append(f"{name} is not an array ({type(state[name]).__name__}: {e}), the model has {want}")
            continue
        if a.dtype == object or not _kind_fits(a, want.dtype):
            need = "a float array" if want.dtype.is_float else f"an array of {want.dtype}"
            bad.append(f"{name} has dtype {_dtype_name(a.dtype)}, the model has {want} ({need} is needed)")
            continue
        if a.shape != tuple(want.shape):
            hint = ""
            if a.ndim == 2 and a.shape[::-1] == tuple(want.shape):
                hint = ": a PyTorch Linear weight? convert with gradfuse.from_pytorch(state_dict, model)"
            bad.append(f"{name} is {_shape(a.shape)}, the model has {want}{hint}")
            continue
        arrays[name] = a
    problems = []
    if strict and missing:
        problems.append("missing " + ", ".join(f"{n} ({expected[n]})" for n in missing))
    if strict and unexpected:
        text = "unexpected " + ", ".join(unexpected)
        if any(n.endswith(_PYTORCH_MARKS) for n in unexpected):
            text += " (a PyTorch state_dict? convert it with gradfuse.from_pytorch(state_dict, model))"
        problems.append(text)
    problems += bad
    if problems:
        raise StateDictError(f"the state_dict does not fit {what}: " + "; ".join(problems))
    return arrays, LoadResult(missing, unexpected)


class _Log:
    def __init__(self):
        self.used: set[str] = set()
        self.ignored: list[str] = []
        self.missing: list[tuple[str, tuple | None]] = []
        self.misshaped: list[str] = []


class StateView:
    """The entries of a state_dict under one module's prefix, as a layer's mapping reads them:
    ``take("weight", shape)`` returns the array (or None, recording it missing or mis-shaped),
    ``sub("fc1")`` the view of a child module, ``ignore(name)`` consumes an entry on purpose."""

    def __init__(self, entries: Mapping[str, np.ndarray], prefix: str = "", log: _Log | None = None,
                 layout: str = "PyTorch"):
        self.entries, self.prefix, self.log, self.layout = entries, prefix, log or _Log(), layout

    def key(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return self.key(name) in self.entries

    def take(self, name: str, shape=None, optional: bool = False) -> np.ndarray | None:
        key = self.key(name)
        if key not in self.entries:
            if not optional:
                self.log.missing.append((key, None if shape is None else tuple(shape)))
            return None
        self.log.used.add(key)
        a = self.entries[key]
        if shape is not None and a.shape != tuple(shape):
            hint = " (transposed: already converted?)" if a.ndim == 2 and a.shape[::-1] == tuple(shape) else ""
            self.log.misshaped.append(f"{key} is {_shape(a.shape)}, expected {_shape(shape)} "
                                      f"in {self.layout}'s layout{hint}")
            return None
        return a

    def ignore(self, name: str) -> None:
        if self.has(name):
            self.log.used.add(self.key(name))
            self.log.ignored.append(self.key(name))

    def sub(self, name: str) -> StateView:
        return StateView(self.entries, f"{self.prefix}{name}.", self.log, self.layout)

    def problems(self, strict: bool) -> list[str]:
        """Missing, unexpected (entries nobody took) and mis-shaped entries, in words."""
        out = []
        if strict and self.log.missing:
            out.append("missing " + ", ".join(k + ("" if s is None else f" ({_shape(s)})")
                                              for k, s in self.log.missing))
        unused = [k for k in self.entries if k not in self.log.used]
        if strict and unused:
            text = "unexpected " + ", ".join(unused)
            if all(k.startswith("module.") for k in self.entries):
                text += " (saved from DistributedDataParallel? strip the 'module.' prefix)"
            elif not self.log.used and self.log.missing:
                text += (" (no name matched: the gradfuse model must keep the PyTorch module's attribute names "
                         "and Sequential indices)")
            out.append(text)
        return out + self.log.misshaped
