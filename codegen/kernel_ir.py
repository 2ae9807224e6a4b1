"""Kernel IR: each fused kernel of a graph as loops over an index space with scalar statements.

Backend-neutral: a backend prints it (``codegen/cpu.py`` as Numba ``@njit`` source). A kernel
reads *buffers* (graph arguments and values written by earlier kernels) through ``Access``es
that say which loop axis indexes each operand axis (broadcasting is an axis without a loop
index), computes *locals* with scalar statements built from the ops' lowering templates, and
writes the values other kernels or the caller need.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from gradfuse.codegen.targets import target as gemm_target
from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import Graph, Node, Value
from gradfuse.ir.registry import get_op, role
from gradfuse.ir.types import DType

from .scalar_lib import specialise

CTOR = {DType.f32: "f32", DType.f64: "f64", DType.i32: "i32", DType.i64: "i64", DType.bool: "b1"}


class CodegenError(GradfuseError):
    """A graph uses something the code generator cannot lower yet."""


@dataclass(frozen=True)
class Access:
    """Reading ``value`` inside a loop over a space of rank ``rank``: operand axis k is indexed
    by loop axis ``axes[k]``, or by 0 where ``axes[k]`` is None (a broadcast size-1 axis)."""

    value: Value
    axes: tuple[int | None, ...]


@dataclass
class Stmt:
    local: str
    expr: str
    node: Node


@dataclass
class Loop:
    """An elementwise loop over ``space``: loads, statements in order, then stores."""

    space: tuple  # dims: int or symbol name
    loads: list[tuple[str, Access]] = field(default_factory=list)
    stmts: list[Stmt] = field(default_factory=list)
    stores: list[tuple[Value, str]] = field(default_factory=list)
    uses_index: bool = False  # the statements read the flat element index `idx` (dropout masks)


@dataclass
class Kernel:
    name: str
    kind: str  # elementwise | gemm | reduction | row | layout | opaque
    nodes: list[Node]
    reads: list[Value]  # buffers read
    writes: list[Value]  # buffers written
    consts: dict[str, str]  # local -> literal expression (scalar constants, element counts)
    anchors: list[Node] = field(default_factory=list)
    prologue: Loop | None = None  # over the anchor's input space (reductions, row ops)
    epilogue: Loop | None = None  # over the anchor's output space (or the whole kernel, if no anchor)
    finale: Loop | None = None  # over () after everything: elementwise ops on an earlier anchor's scalar
    symbols: list[str] = field(default_factory=list)  # batch-size symbols the kernel's code uses
    same_storage: dict[Value, Value] = field(default_factory=dict)  # read buffer -> the written one in its storage


@dataclass
class KernelProgram:
    graph: Graph
    kernels: list[Kernel]
    schedule: list[Kernel | Node]  # kernels and kernel-less nodes (views) in order
    buffers: list[Value]  # values kernels write (and returned views), allocated by the caller
    symbols: list[str]  # batch-size symbols, bound from the arguments at run time


def local_name(v: Value) -> str:
    return "v_" + re.sub(r"[^A-Za-z0-9_]", "_", v.name)


def float_ctor(node: Node) -> str:
    types = [v.type.dtype for v in node.outputs + node.inputs]
    return CTOR[next((t for t in types if t.is_float), DType.f32)]


def float_literal(value: float) -> str:
    """A Python float as source the backends compile: ``repr`` for finite values, ``np.inf``,
    ``-np.inf`` and ``np.nan`` for the others (``repr`` gives ``inf``, an unknown name there)."""
    value = float(value)
    if math.isnan(value):
        return "np.nan"
    if math.isinf(value):
        return "np.inf" if value > 0 else "-np.inf"
    return repr(value)


def _literal(value: float, dtype: DType) -> str:
    if dtype.is_float:
        return f"{CTOR[dtype]}({float_literal(value)})"
    if dtype is DType.bool:
        return "True" if value else "False"
    return f"{CTOR[dtype]}({int(value)})"


class Lowering:
    def __init__(self, g: Graph, target: str = "cpu"):
        self.g = g
        gemm = gemm_target(target).gemm
        self.producer = g.producers()
        self.users = g.users()
        self.outs = set(g.outputs) | {new for _, new in g.updates}
        self.kernel_of = {n: n.kernel for n in g.nodes}
        self.materialized: set[Value] = {v for _, v in g.args}
        for n in g.nodes:
            for v in n.outputs:
                if role(n) == "immediate":  # a literal, unless returned or read as an array (sum of a constant)
                    keep = v in self.outs or self.needs_buffer(v, self.users[v])
                else:
                    in_memory = role(n) == "gemm" and gemm.product_in_memory  # BLAS writes the product before
                    keep = v in self.outs or role(n) == "view" or in_memory or any(  # the epilogue reads it
                        self.kernel_of[u] != n.kernel or n.kernel is None for u in self.users[v])
                if keep:
                    self.materialized.add(v)
        self.symbols = sorted({s for _, v in g.args for s in v.type.symbols})

    @staticmethod
    def needs_buffer(v: Value, readers: list[Node]) -> bool:
        """Whether one of ``readers`` takes ``v`` as an array rather than as a scalar literal."""
        return any(w is v and role(u) != "elementwise" and i not in get_op(u.op).scalar_operands
                   for u in readers for i, w in enumerate(u.inputs))

    def immediate(self, v: Value) -> str | None:
        """A literal or shape expression for a scalar constant or an element count."""
        n = self.producer.get(v)
        if n is None or role(n) != "immediate":
            return None
        if get_op(n.op).lowering.get("immediate") == "value":
            return _literal(n.attrs["value"], n.attrs["dtype"])
        dims = [n.inputs[0].type.shape[a] for a in n.attrs["axes"]]  # a count
        return f"{CTOR[v.type.dtype]}({' * '.join(str(d) for d in dims) or '1'})"

    def expr(self, n: Node, operands: list[str]) -> str:
        opdef = get_op(n.op)
        if "expr" not in opdef.lowering:
            raise CodegenError(f"no scalar lowering for {n.op} (%{n.outputs[0].name})")
        ftype = float_ctor(n)
        fields = {k: (v.value if isinstance(v, DType) else float_literal(v) if isinstance(v, float) else v)
                  for k, v in n.attrs.items()}
        text = opdef.lowering["expr"].format(*operands, F=ftype, OUT=CTOR[n.outputs[0].type.dtype], idx="idx",
                                             **fields)
        return specialise(text, ftype)

    def loop(self, space: tuple, nodes: list[Node], kernel_nodes: set[Node], consts: dict[str, str],
             stores_to: list[Value] | None = None) -> Loop:
        """An elementwise loop computing ``nodes`` over ``space``; operands made inside the
        kernel are locals, others are loads (broadcast into ``space``) or constants."""
        loop = Loop(tuple(space))
        loaded: dict[Value, str] = {}
        for n in nodes:
            imm = self.immediate(n.outputs[0])
            if imm is not None:  # a constant or element count that is itself an output
                loop.stmts.append(Stmt(local_name(n.outputs[0]), imm, n))
                continue
            operands = []
            for v in n.inputs:
                p = self.producer.get(v)
                imm = self.immediate(v)
                if imm is not None:
                    consts.setdefault(local_name(v), imm)
                    operands.append(local_name(v))
                elif p in kernel_nodes:  # computed earlier in this loop, or the anchor's result
                    operands.append(local_name(v))
                else:
                    if v not in loaded:
                        loaded[v] = local_name(v)
                        loop.loads.append((local_name(v), self.access(v, space)))
                    operands.append(loaded[v])
            loop.stmts.append(Stmt(local_name(n.outputs[0]), self.expr(n, operands), n))
            loop.uses_index |= "{idx}" in get_op(n.op).lowering.get("expr", "")
        for n in nodes:
            for v in n.outputs:
                if v in self.materialized and (stores_to is None or v in stores_to):
                    loop.stores.append((v, local_name(v)))
        return loop

    def access(self, v: Value, space: tuple) -> Access:
        rank, k = len(space), v.type.rank
        if k > rank:
            raise CodegenError(f"%{v.name}: {v.type} does not broadcast into {list(space)}")
        axes = []
        for j, d in enumerate(v.type.shape):
            loop_axis = rank - k + j
            axes.append(None if d == 1 and space[loop_axis] != 1 else loop_axis)
        return Access(v, tuple(axes))

    def kernel(self, name: str, nodes: list[Node]) -> Kernel:
        inside = set(nodes)
        produced = list(dict.fromkeys(v for n in nodes for v in n.outputs))  # ordered: stable signatures
        reads = list(dict.fromkeys(v for n in nodes if role(n) != "immediate" for v in n.inputs if v not in produced
                                   and (self.immediate(v) is None or self.needs_buffer(v, nodes))))
        writes = [v for v in produced if v in self.materialized]
        consts: dict[str, str] = {}
        consts_of = [v for n in nodes for v in n.inputs if self.immediate(v) is not None]
        for v in consts_of:
            consts.setdefault(local_name(v), self.immediate(v))
        anchors = [n for n in nodes if role(n) in ("gemm", "reduction", "row", "layout", "opaque")]
        kind = role(anchors[0]) if anchors else "elementwise"
        # symbols of every shape the code mentions: buffers, results, and element counts (``count``
        # of an axis of size N may be the only place N appears in a kernel)
        counted = [n.inputs[0] for n in [*map(self.producer.get, consts_of), *nodes]
                   if get_op(n.op).lowering.get("immediate") == "count"]
        symbols = sorted({s for v in [*reads, *produced, *counted] for s in v.type.symbols})
        k = Kernel(name, kind, nodes, reads, writes, consts, anchors, symbols=symbols)
        if kind == "opaque":
            assert len(nodes) == 1
            return k
        if not anchors:
            k.epilogue = self.loop(nodes[-1].outputs[0].type.shape, nodes, inside, consts)
            return k
        anchor_set = set(anchors)
        before = self._upstream(anchors, inside)
        after = self._downstream(anchors, inside)
        # the prologue runs over the anchor's input: what the anchor reads, and (horizontal fusion)
        # other elementwise work over that space that does not need the anchor's result; the
        # epilogue runs over the last anchor's output (the fusion pass's epilogue space)
        in_space = anchors[0].inputs[0].type.shape if kind in ("reduction", "row") else None
        space = anchors[-1].outputs[0].type.shape
        pro, epi = [], []
        for n in nodes:
            if n not in anchor_set:
                shape = n.outputs[0].type.shape
                side = n not in after and shape == in_space and shape != space
                (pro if n in before or side else epi).append(n)
        if pro:
            k.prologue = self.loop(in_space, pro, inside, consts)
        # nodes over a row op's scalar result (the loss of a cross-entropy, whose gradient may share
        # the rows) run once after all rows, in the finale
        scalars = [v for a in anchors for v in a.outputs if v.type.shape == () != in_space] if kind == "row" else []
        main = [n for n in epi if n.outputs[0].type.shape == space and not (scalars and space == ())]
        rest = [n for n in epi if n not in main]
        if any(n.outputs[0].type.shape != () for n in rest) or self._reads(main, rest) or \
                any(v in scalars for n in main for v in n.inputs):
            raise CodegenError(f"kernel {name}: cannot order the epilogue of {[a.op for a in anchors]}: "
                               f"{[str(n.outputs[0].type) for n in main]} over {list(space)} and "
                               f"{[str(n.outputs[0].type) for n in rest]} after the rows")
        if main:
            # prologue values the epilogue reads are recomputed (same space), not kept per element
            again = [n for n in pro if n in self._upstream(main, set(pro))]
            k.epilogue = self.loop(space, again + main, inside, consts, [v for n in main for v in n.outputs])
        if rest:
            k.finale = self.loop((), rest, inside, consts)
        return k

    def _downstream(self, anchors: list[Node], inside: set[Node]) -> set[Node]:
        """Kernel nodes that read an anchor's result, directly or through other kernel nodes."""
        seen: set[Node] = set()
        stack = [u for a in anchors for v in a.outputs for u in self.users[v] if u in inside]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(u for v in n.outputs for u in self.users[v] if u in inside)
        return seen

    def _reads(self, readers: list[Node], nodes: list[Node]) -> bool:
        produced = {v for n in nodes for v in n.outputs}
        return any(v in produced for n in readers for v in n.inputs)

    def _upstream(self, anchors: list[Node], inside: set[Node]) -> set[Node]:
        """Kernel nodes that an anchor reads, directly or through other kernel nodes."""
        seen: set[Node] = set()
        stack = [self.producer[v] for a in anchors for v in a.inputs if self.producer.get(v) in inside]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(self.producer[v] for v in n.inputs if self.producer.get(v) in inside)
        return seen


def lower(g: Graph, target: str = "cpu") -> KernelProgram:
    """The kernel program of a fused graph (unfused nodes become one-node kernels) for ``target``."""
    lw = Lowering(g, target)
    kernels: list[Kernel] = []
    schedule: list[Kernel | Node] = []
    groups: dict[str, list[Node]] = {}
    for n in g.nodes:
        r = role(n)
        if r == "immediate" and n.outputs[0] not in lw.materialized:
            continue
        if r == "view":
            schedule.append(n)
            continue
        key = n.kernel or f"node.{n.outputs[0].name}"
        if key not in groups:
            groups[key] = []
            schedule.append(key)
        groups[key].append(n)
    for i, item in enumerate(schedule):
        if isinstance(item, str):
            k = lw.kernel(f"k{len(kernels)}", groups[item])
            kernels.append(k)
            schedule[i] = k
    # a view is a local of the step function; it gets a buffer (a copy) only when it is returned
    buffers = [v for n in g.nodes for v in n.outputs
               if v in lw.materialized and (role(n) != "view" or v in lw.outs)]
    return KernelProgram(g, kernels, schedule, buffers, lw.symbols)
