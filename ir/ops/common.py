"""Shape and dtype rules shared by several ops' ``infer`` functions."""

from __future__ import annotations

from gradfuse.errors import ShapeError

from ..types import Dim, DType, TensorType

FLOATS = (DType.f32, DType.f64)
NUMERIC = (DType.f32, DType.f64, DType.i32, DType.i64)


def broadcast_shapes(op: str, *types: TensorType) -> tuple[Dim, ...]:
    """numpy broadcasting over dims that may be symbols (a symbol only matches itself or 1)."""
    rank = max(t.rank for t in types)
    out: list[Dim] = []
    for i in range(rank):
        dims = {t.shape[i - rank + t.rank] for t in types if i - rank + t.rank >= 0}
        dims.discard(1)
        if len(dims) > 1:
            shown = " and ".join(str(t) for t in types)
            raise ShapeError(f"{op}: cannot broadcast {shown} (axis {i - rank} has sizes "
                             f"{', '.join(map(str, sorted(dims, key=str)))})",
                             hint="reshape one operand, or check the layer sizes")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def same_dtype(op: str, *types: TensorType, allowed=NUMERIC) -> DType:
    dtypes = {t.dtype for t in types}
    if len(dtypes) > 1:
        shown = ", ".join(str(t) for t in types)
        raise ShapeError(f"{op}: operands have different dtypes ({shown})",
                         hint="cast one of them with .astype(...)")
    (dt,) = dtypes
    if dt not in allowed:
        shown = ", ".join(str(t) for t in types)
        raise ShapeError(f"{op}: operand{'s' if len(types) > 1 else ''} {shown} of dtype {dt} not supported "
                         f"(expected {' or '.join(map(str, allowed))})")
    return dt


def require_dtype(op: str, what: str, t: TensorType, allowed) -> None:
    if t.dtype not in allowed:
        raise ShapeError(f"{op}: {what} must be {' or '.join(map(str, allowed))}, got {t}")


def require_rank(op: str, what: str, t: TensorType, rank: int | tuple[int, ...], hint: str | None = None):
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    if t.rank not in ranks:
        want = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]}" if \
            ranks == tuple(range(ranks[0], ranks[-1] + 1)) else " or ".join(map(str, ranks))
        raise ShapeError(f"{op}: {what} must have rank {want}, got {t}", hint)


def check_axes(op: str, t: TensorType, axes: tuple[int, ...]) -> None:
    if list(axes) != sorted(set(axes)) or any(a < 0 or a >= t.rank for a in axes):
        raise ShapeError(f"{op}: axes {list(axes)} are not sorted, distinct axes of {t}")


def check_axis(op: str, t: TensorType, axis: int) -> None:
    if not 0 <= axis < t.rank:
        raise ShapeError(f"{op}: axis {axis} is out of range for {t}")
