"""Element types and tensor types of the graph IR.

A shape is a tuple of dimensions; a dimension is either a non-negative int, a symbol (an
identifier such as ``N``, the batch size) bound when the graph runs, or a product of symbols and
one int written ``"N*32"`` (what ``reshape(-1, 94)`` makes of ``[N,32,94]``; canonical form: the
symbols sorted, then the int factor, see :func:`dim_product`). Products appear only in results of
reshape; arguments have plain symbols, which bind the products' values.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np

Dim = int | str
Shape = tuple[Dim, ...]

_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
_PRODUCT = re.compile(r"^([A-Za-z_][A-Za-z_0-9]*|[0-9]+)(\*([A-Za-z_][A-Za-z_0-9]*|[0-9]+))+$")


class DType(enum.Enum):
    f32 = "f32"
    f64 = "f64"
    i32 = "i32"
    i64 = "i64"
    bool = "bool"

    @property
    def np(self) -> np.dtype:
        return _NUMPY_DTYPES[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f64)

    @property
    def is_int(self) -> bool:
        return self in (DType.i32, DType.i64)

    @property
    def itemsize(self) -> int:
        return self.np.itemsize

    @staticmethod
    def of(x) -> DType:
        """The DType of a numpy dtype, a DType or its name (``"f32"``)."""
        if isinstance(x, DType):
            return x
        if isinstance(x, str) and x in DType.__members__:
            return DType[x]
        dt = np.dtype(x)
        for d, name in _NUMPY.items():
            if np.dtype(name) == dt:
                return d
        raise TypeError(f"gradfuse has no dtype for numpy {dt} (supported: f32, f64, i32, i64, bool)")

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return self.value


_NUMPY = {DType.f32: "float32", DType.f64: "float64", DType.i32: "int32", DType.i64: "int64",
          DType.bool: "bool"}
_NUMPY_DTYPES = {d: np.dtype(name) for d, name in _NUMPY.items()}


def is_symbol(d: Dim) -> bool:
    return isinstance(d, str)


def dim_factors(d: Dim) -> tuple[list[str], int]:
    """(the symbols, the int factor) of a dimension: ``"N*32"`` -> (["N"], 32), 5 -> ([], 5)."""
    if isinstance(d, int):
        return [], d
    syms, k = [], 1
    for f in d.split("*"):
        if f.isdigit():
            k *= int(f)
        else:
            syms.append(f)
    return syms, k


def dim_product(symbols, k: int) -> Dim:
    """The canonical dimension of a product of ``symbols`` and the int ``k``."""
    syms = sorted(symbols)
    if not syms or k == 0:
        return k
    return "*".join(syms + ([str(k)] if k != 1 else []))


def dims_product(dims) -> Dim:
    """The dimension of the product of ``dims``: [N, 32] -> "N*32", [4, 8] -> 32."""
    syms, k = [], 1
    for d in dims:
        s, f = dim_factors(d)
        syms += s
        k *= f
    return dim_product(syms, k)


def dim_value(d: Dim, bindings) -> int:
    """The size of a dimension with its symbols bound."""
    if isinstance(d, int):
        return d
    if "*" not in d:
        return bindings[d]
    syms, k = dim_factors(d)
    for s in syms:
        k *= bindings[s]
    return k


def check_dim(d) -> Dim:
    if isinstance(d, bool) or not isinstance(d, int | str):
        raise TypeError(f"a dimension is an int or a symbol name, not {d!r}")
    if isinstance(d, int) and d < 0:
        raise ValueError(f"a dimension cannot be negative: {d}")
    if isinstance(d, str) and not _SYMBOL.match(d):
        if not _PRODUCT.match(d):
            raise ValueError(f"a symbolic dimension must be an identifier (or a product like N*32), not {d!r}")
        d = dim_product(*dim_factors(d))
    return d


def format_shape(shape: Shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: Shape

    def __post_init__(self):
        object.__setattr__(self, "dtype", DType.of(self.dtype))
        object.__setattr__(self, "shape", tuple(check_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def symbols(self) -> set[str]:
        return {s for d in self.shape if isinstance(d, str) for s in dim_factors(d)[0]}

    def concrete(self, bindings: dict[str, int]) -> tuple[int, ...]:
        """The shape with every symbol replaced by its bound size."""
        return tuple(dim_value(d, bindings) for d in self.shape)

    def nbytes(self, bindings: dict[str, int]) -> int:
        return int(np.prod(self.concrete(bindings), dtype=np.int64)) * self.dtype.itemsize

    def with_shape(self, shape) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype) -> TensorType:
        return TensorType(DType.of(dtype), self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}{format_shape(self.shape)}"


_TYPE_RE = re.compile(r"^\s*(f32|f64|i32|i64|bool)\s*\[([^\]]*)\]\s*$")


def parse_type(text: str) -> TensorType:
    """``"f32[N,64]"`` -> TensorType(f32, ("N", 64)); raises ValueError on bad text."""
    m = _TYPE_RE.match(text)
    if not m:
        raise ValueError(f"not a tensor type: {text!r} (expected e.g. 'f32[N,64]' or 'f32[]')")
    dims = [d.strip() for d in m.group(2).split(",")] if m.group(2).strip() else []
    return TensorType(DType[m.group(1)], tuple(int(d) if d.isdigit() else d for d in dims))


def as_type(x) -> TensorType:
    return x if isinstance(x, TensorType) else parse_type(x)
