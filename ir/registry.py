"""The op registry: one record per op holding everything the pipeline needs of it.

An :class:`OpDef` carries the op's shape/dtype rule (``infer``), its numpy semantics (``ref``,
the reference interpreter and test oracle), its attributes with their kinds and defaults, its
VJP rule (or why it has none) and its lowerings. Ops are defined in ``ir/ops/*.py``; adding an
op touches one of those files plus tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradfuse.errors import AttrError

from .types import DType, TensorType, check_dim

REQUIRED = object()

# Attribute kinds: how a value is checked, normalised and printed.
ATTR_KINDS = ("int", "float", "bool", "str", "dtype", "ints", "dims", "float?")


@dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = REQUIRED
    doc: str = ""

    def __post_init__(self):
        assert self.kind in ATTR_KINDS, self.kind


def normalize_attr(op: str, name: str, kind: str, value: Any) -> Any:
    """Check ``value`` against ``kind`` and return its canonical (hashable) form."""

    def bad(what: str):
        return AttrError(f"{op}: attribute {name}={value!r} should be {what}")

    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an int")
        return int(value)
    if kind in ("float", "float?"):
        if value is None and kind == "float?":
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "dtype":
        try:
            return DType.of(value)
        except TypeError:
            raise bad("a dtype (f32, f64, i32, i64, bool)") from None
    if kind == "ints":
        if not isinstance(value, list | tuple) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise bad("a list of ints")
        return tuple(int(v) for v in value)
    if kind == "dims":
        if not isinstance(value, list | tuple):
            raise bad("a list of dimensions")
        try:
            return tuple(check_dim(v) for v in value)
        except (TypeError, ValueError) as e:
            raise bad(f"a list of dimensions ({e})") from None
    raise AssertionError(kind)


# layout: moves data (transpose, slice, concat, gather), storing each output element once with its
# final value, so an elementwise epilogue runs at the store; opaque: a kernel of its own
ROLES = ("elementwise", "gemm", "reduction", "row", "layout", "opaque", "view", "immediate")


@dataclass(frozen=True)
class IndexCheck:
    """Operand ``operand`` holds integer indices into a table of ``size(node)`` entries (labels
    into classes, ids into rows): the runtime refuses out-of-range ones before any kernel reads
    with them, since a kernel would read or write out of bounds."""

    operand: int
    size: Callable[[Any], int]
    what: str  # "labels", "ids"

    def operands(self, node) -> list:
        return [node.inputs[self.operand]]

    def run(self, node, arrays: Mapping, sizes: Mapping[str, int]) -> None:
        from gradfuse.errors import InputError

        a, size = arrays.get(node.inputs[self.operand].name), self.size(node)
        if a is not None and a.size and (a.min() < 0 or a.max() >= size):
            raise InputError(f"%{node.inputs[self.operand].name}: {self.what} must lie in [0, {size}), "
                             f"got min {a.min()}, max {a.max()}")


@dataclass(frozen=True)
class RowsCheck:
    """Statistics over the rows of operand ``operand`` (all axes but the last) need at least
    ``rows`` of them: a batch of one has no variance to normalise with."""

    operand: int
    rows: int = 2

    def operands(self, node) -> list:
        return []

    def run(self, node, arrays: Mapping, sizes: Mapping[str, int]) -> None:
        import math

        from gradfuse.errors import InputError

        x = node.inputs[self.operand]
        rows = math.prod(x.type.concrete(sizes)[:-1])
        if rows < self.rows:
            raise InputError(f"%{x.name}: {node.op} in training needs at least {self.rows} values per feature, "
                             f"got {rows} (batch size 1? use a larger batch)")


@dataclass(frozen=True)
class RowStat:
    """A statistic of one row: ``combine`` (``sum`` or ``max``) of ``element`` over the row's
    elements (from the combine's identity: a parallel backend starts every thread there), then
    ``finish`` (an expression of the accumulated value ``{acc}``; '' to keep it)."""

    name: str
    combine: str
    element: str
    finish: str = ""


@dataclass(frozen=True)
class RowProgram:
    """A row op as statistics of each row, per-row scalars and the result per element (or per
    row, ``result="scalar"``: averaged over the rows, a loss). Codegen makes one loop over the
    row per level of statistics (those reading no other statistic first) and one for the
    result, sharing statistics of the same name with the kernel's other row ops.

    Expressions are templates over ``{x}`` (the row's element at ``{j}``), ``{x@name}`` (the row
    at the index in per-row scalar ``name``), ``{C}`` and ``{R}`` (row length, row count), ``{F}``
    (the float constructor), statistics and scalars by name, the op's attributes, and operand k
    as ``{in1}``, ``{in2}``...: a scalar, a vector along the row (``[j]``) or a value per row."""

    stats: tuple[RowStat, ...]
    lets: tuple[tuple[str, str], ...] = ()  # per-row scalars (name, expression), in order
    out: str = ""  # the result element (or the per-row value for a scalar result)
    result: str = "row"  # "row" or "scalar"
    provides: tuple[tuple[str, str], ...] = ()  # statistics other row ops want, from this one's (no loop)


@dataclass(frozen=True)
class OpDef:
    """Everything about one op, for every stage that asks.

    - ``infer(*types, **attrs)`` returns the result TensorType (or a tuple for several results)
      and raises :class:`~gradfuse.errors.ShapeError` for operands it cannot take.
    - ``ref(*arrays, **attrs)`` computes the result with numpy.
    - ``vjp`` emits the backward as IR; ``nondiff`` says why an op has no gradient instead.
    - ``role``: how fusion treats it (one of ROLES; default from ``kind``: elementwise and source
      ops are elementwise, reductions reductions, the rest opaque); ``immediate_scalar``: a
      rank-0 result is an immediate (a literal in the code), not a buffer (``const``).
    - ``lowering``: what codegen needs, shared by the backends: ``expr`` (elementwise: a scalar
      expression template), ``combine``/``identity``/``finish`` (reductions: ``{a} + {b}``, ``0``
      or ``lowest``, ``mean`` to divide by the count), ``row`` (row ops: a :class:`RowProgram`),
      ``row_axis`` (row ops: ``node -> axis``, default the last), ``nest`` (other structured
      ops: ``nest(builder, node)`` writes the op's loop nest with the builder of
      ``codegen/loop_nests.py``), ``template`` (a named structured op a backend prints itself:
      ``gemm``), ``immediate`` (an op whose result is a literal in the code: ``value``, its
      ``value`` attribute; ``count``, the product of its operand's dims over ``axes``),
      ``gemm_update`` (what a GEMM's alpha and beta can do in its place: ``scale``, multiply
      the product by a scalar; ``minus``, ``c - product``: an SGD update folded into the GEMM).
    - ``scalar_operands``: operand positions a structured kernel reads as one scalar (so a
      constant may stay a literal there).
    - ``checks``: what the runtime verifies of the arguments before launching (IndexCheck,
      RowsCheck).
    - ``aligned``: output k -> operand j that the op reads only at the index it writes of output
      k (BatchNorm's running statistics): output k may take operand j's storage in place.
    """

    name: str
    kind: str  # elementwise | reduction | shape | structured | source
    infer: Callable[..., Any]
    ref: Callable[..., Any]
    arity: int | None  # number of operands; None means one or more
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    output_names: tuple[str, ...] = ("out",)
    doc: str = ""
    vjp: Callable[..., Any] | None = None
    nondiff: str | None = None
    lowering: Mapping[str, Any] = field(default_factory=dict)
    role: str = ""
    immediate_scalar: bool = False
    scalar_operands: frozenset[int] = frozenset()
    checks: tuple = ()
    aligned: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.role:
            default = {"elementwise": "elementwise", "source": "elementwise", "reduction": "reduction"}
            object.__setattr__(self, "role", default.get(self.kind, "opaque"))
        assert self.role in ROLES, f"{self.name}: role {self.role!r}"

    def row_axis(self, node) -> int:
        """The axis a row op works along (softmax's ``axis``; classes, features: the last)."""
        axis = self.lowering.get("row_axis")
        return axis(node) if axis is not None else node.inputs[0].type.rank - 1

    def normalize_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            known = ", ".join(sorted(self.attrs)) or "none"
            raise AttrError(f"{self.name}: unknown attribute {', '.join(sorted(unknown))} (it takes: {known})")
        out = {}
        for name, spec in self.attrs.items():
            if name in attrs:
                out[name] = normalize_attr(self.name, name, spec.kind, attrs[name])
            elif spec.default is REQUIRED:
                raise AttrError(f"{self.name}: missing required attribute {name}")
            else:
                out[name] = spec.default
        return out

    def check_arity(self, n: int) -> None:
        from gradfuse.errors import ShapeError

        if self.arity is None and n == 0:
            raise ShapeError(f"{self.name} needs at least one operand")
        if self.arity is not None and n != self.arity:
            raise ShapeError(f"{self.name} takes {self.arity} operand(s), got {n}")

    def infer_types(self, types: list[TensorType], attrs: dict[str, Any]) -> tuple[TensorType, ...]:
        self.check_arity(len(types))
        out = self.infer(*types, **attrs)
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == len(self.output_names), f"{self.name}: output_names does not match infer"
        return out

    def run_ref(self, arrays: list, attrs: dict[str, Any]) -> tuple:
        out = self.ref(*arrays, **attrs)
        return out if isinstance(out, tuple) else (out,)


_REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    assert opdef.name not in _REGISTRY, f"op {opdef.name} registered twice"
    _REGISTRY[opdef.name] = opdef
    return opdef


def role(node) -> str:
    """How ``node`` takes part in fusion: one of ROLES (its op's ``role``, or ``immediate`` for a
    rank-0 result of an op whose scalars are literals)."""
    op = get_op(node.op)
    if op.immediate_scalar and node.outputs[0].type.rank == 0:
        return "immediate"
    return op.role


def get_op(name: str) -> OpDef:
    _load_ops()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AttrError(f"unknown op '{name}'") from None


def all_ops() -> dict[str, OpDef]:
    _load_ops()
    return dict(_REGISTRY)


_LOADED = False


def _load_ops() -> None:
    """Import the op records once (an import statement costs microseconds even when cached, and
    the passes ask for an op's record hundreds of thousands of times on a large graph)."""
    global _LOADED
    if not _LOADED:
        from . import ops  # noqa: F401  (registers every op on first import)

        _LOADED = True
