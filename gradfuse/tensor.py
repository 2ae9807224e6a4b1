"""The symbolic tensor users manipulate while a model is traced.

A Tensor wraps an IR value; its operators and methods are thin aliases of
:mod:`gradfuse.functional`, so ``x @ w + b`` and ``F.add(F.matmul(x, w), b)`` record the same nodes.
"""

from __future__ import annotations

from gradfuse.ir.graph import Value
from gradfuse.ir.types import Dim, DType, TensorType


class Tensor:
    __slots__ = ("value",)

    def __init__(self, value: Value):
        self.value = value

    @property
    def type(self) -> TensorType:
        return self.value.type

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.value.type.shape

    @property
    def dtype(self) -> DType:
        return self.value.type.dtype

    @property
    def ndim(self) -> int:
        return self.value.type.rank

    def __repr__(self) -> str:
        return f"Tensor(%{self.value.name}: {self.type})"

    def __bool__(self):
        raise TypeError("a traced tensor has no truth value: use gradfuse.functional.where for "
                        "data-dependent choices")

    __hash__ = object.__hash__
    __array_ufunc__ = None  # numpy defers to us: `array * x` raises instead of looping over elements

    # arithmetic
    def __add__(self, o): return F.add(self, o)
    def __radd__(self, o): return F.add(o, self)
    def __sub__(self, o): return F.sub(self, o)
    def __rsub__(self, o): return F.sub(o, self)
    def __mul__(self, o): return F.mul(self, o)
    def __rmul__(self, o): return F.mul(o, self)
    def __truediv__(self, o): return F.div(self, o)
    def __rtruediv__(self, o): return F.div(o, self)
    def __pow__(self, o): return F.pow(self, o)
    def __rpow__(self, o): return F.pow(o, self)
    def __matmul__(self, o): return F.matmul(self, o)
    def __rmatmul__(self, o): return F.matmul(o, self)
    def __neg__(self): return F.neg(self)
    def __abs__(self): return F.abs(self)

    # comparisons give bool tensors
    def __lt__(self, o): return F.lt(self, o)
    def __le__(self, o): return F.le(self, o)
    def __gt__(self, o): return F.gt(self, o)
    def __ge__(self, o): return F.ge(self, o)
    def __eq__(self, o): return F.eq(self, o)  # type: ignore[override]
    def __ne__(self, o): return F.ne(self, o)  # type: ignore[override]

    def __getitem__(self, index): return F.index(self, index)

    # methods
    def reshape(self, *shape): return F.reshape(self, *shape)
    def transpose(self, *perm): return F.transpose(self, *perm)
    def flatten(self, start: int = 1): return F.flatten(self, start)
    def sum(self, axis=None, keepdims: bool = False): return F.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims: bool = False): return F.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims: bool = False): return F.max(self, axis, keepdims)
    def astype(self, dtype): return F.cast(self, dtype)
    def exp(self): return F.exp(self)
    def log(self): return F.log(self)
    def sqrt(self): return F.sqrt(self)
    def tanh(self): return F.tanh(self)
    def sigmoid(self): return F.sigmoid(self)
    def relu(self): return F.relu(self)

    @property
    def T(self):
        """Swap the last two axes (the identity below rank 2, as numpy)."""
        if self.ndim < 2:
            return self
        perm = list(range(self.ndim))
        perm[-2:] = perm[-1], perm[-2]
        return F.transpose(self, *perm)


from gradfuse import functional as F  # noqa: E402  (functional builds on Tensor)
