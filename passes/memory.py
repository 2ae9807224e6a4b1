"""Memory planning: which values a fused graph writes to memory, when each is live, which may
overwrite a dead operand in place, and where each lives in one arena for a given batch size.

The schedule is the kernels and kernel-less nodes of the graph, in order (an unfused graph: each
materialized node is its own kernel). A value needs a buffer when its kernel writes it to memory:
a node of another step reads it, or it is a graph output or an update's new value. Values read
only inside their kernel stay in registers; immediates (scalar constants, ``count``) are folded;
a ``reshape`` is a view of its operand's buffer; arguments live in the caller's storage.

A value takes over the storage of an operand that dies at its step when the kernel reads that
operand only at the element it writes. Optimizer updates so write parameters and their state in
place, which costs a write-after-read order: every reader of ``%w`` runs before ``%w.next``. That
order can keep a large activation alive, so the planner also tries memory-aware schedules and
keeps the one with the smallest arena, saying which updates it gave up and why.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

from gradfuse.codegen.targets import target as gemm_target
from gradfuse.ir.graph import Graph, GraphBuilder, Node, Value
from gradfuse.ir.registry import get_op
from gradfuse.ir.registry import role as _op_role
from gradfuse.ir.types import TensorType

from .buckets import assign_with_buckets, bucket_members, bucket_order
from .buckets import describe as describe_buckets
from .manager import Pass, PassResult, register_pass

ALIGN = 64  # bytes; every arena offset is a multiple
MAX_TRIALS = 256  # schedules the search may try, at most (each costs one greedy ordering)
CHECKPOINT = 32  # steps between the scheduler's snapshots of its state


@dataclass(frozen=True)
class Step:
    index: int
    name: str  # the kernel (``k3``), or the node of a kernel-less or unfused step (``%c0``, ``matmul %h``)
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class Placement:
    """Where one value lives. ``kind``: ``arena`` (a buffer of its own), ``in_place`` (the storage
    of ``in_place_of``, dead from this step), ``view`` (``alias_of``'s storage), ``arg`` (caller's
    storage), ``register`` (inside its kernel only), ``immediate`` (folded constant)."""

    value: str
    type: TensorType
    kind: str
    nbytes: int
    first: int | None = None  # the step writing it (-1: an argument, written by the caller)
    last: int | None = None  # the last step reading it (the last step for outputs and updates)
    storage: str | None = None  # the arena buffer or argument holding it
    offset: int | None = None  # its byte offset in the arena (None outside the arena)
    alias_of: str | None = None
    in_place_of: str | None = None


@dataclass
class Buffer:
    """One arena allocation, shared by the values (views, in-place successors) listed in ``values``."""

    name: str
    type: TensorType
    nbytes: int
    first: int
    last: int
    offset: int = 0
    values: list[str] = field(default_factory=list)

    def live_with(self, other: Buffer) -> bool:
        return self.first <= other.last and other.first <= self.last

    def overlaps(self, other: Buffer) -> bool:
        return self.offset < other.offset + other.nbytes and other.offset < self.offset + self.nbytes


@dataclass(frozen=True)
class UpdatePlan:
    arg: str
    value: str
    in_place: bool
    why: str  # where the new value is written, and for an update not in place, why not


@dataclass
class MemoryPlan:
    graph: str
    batch: int | None  # the size every batch symbol is bound to; None where ``sizes`` differ
    steps: list[Step]
    values: dict[str, Placement]
    buffers: list[Buffer]
    updates: list[UpdatePlan]
    peak: int  # the arena's size in bytes
    no_reuse: int  # every value written to memory in an allocation of its own (no reuse, no in place)
    lower_bound: int  # the most bytes of buffers live at any one step
    schedule: str = "graph order"
    considered: list[tuple[str, int, int]] = field(default_factory=list)  # (schedule, peak, updates in place)
    sizes: dict[str, int] = field(default_factory=dict)  # the size of each batch symbol of the graph
    buckets: dict[int, list[str]] = field(default_factory=dict)  # all-reduce bucket -> its buffers (contiguous)

    @property
    def in_place_updates(self) -> list[UpdatePlan]:
        return [u for u in self.updates if u.in_place]

    def overlaps(self) -> list[tuple[str, str]]:
        """Pairs of buffers live at a common step whose bytes overlap: empty for a valid plan."""
        return [(a.name, b.name) for i, a in enumerate(self.buffers) for b in self.buffers[i + 1:]
                if a.nbytes and b.nbytes and a.live_with(b) and a.overlaps(b)]

    def render(self) -> str:
        def ratio(a: int, b: int) -> str:
            return f"{a / b:.2f}" if b else "-"

        bound = f"batch N={self.batch}" if self.batch is not None else \
            "sizes " + ", ".join(f"{s}={n}" for s, n in sorted(self.sizes.items()))
        lines = [f"memory plan @{self.graph} ({bound}): {len(self.steps)} steps, {self.schedule}",
                 f"  arena (peak)          {self.peak:>12,} B",
                 f"  max-live lower bound  {self.lower_bound:>12,} B   peak / bound = "
                 f"{ratio(self.peak, self.lower_bound)}",
                 f"  no reuse              {self.no_reuse:>12,} B   peak / no reuse = {ratio(self.peak, self.no_reuse)}"
                 "  (every value written to memory in its own allocation)"]
        if len(self.considered) > 1:
            lines.append("  schedules tried: " + "; ".join(f"{name}: {peak:,} B, {n}/{len(self.updates)} updates in "
                                                          f"place" for name, peak, n in self.considered))
        if self.updates:
            lines.append(f"  updates in place: {len(self.in_place_updates)} of {len(self.updates)}")
            for u in self.updates:
                lines.append(f"    %{u.arg} <- %{u.value}: {u.why}")
        lines.append("  schedule: " + ", ".join(f"{s.index} {s.name}" for s in self.steps))
        lines.append("  buffers:")
        lines.append(f"    {'value':<36} {'type':<16} {'bytes':>10} {'offset':>10}  live steps")
        for b in sorted(self.buffers, key=lambda b: (b.offset, b.first)):
            lines.append(f"    %{b.name:<35} {str(b.type):<16} {b.nbytes:>10,} {b.offset:>10,}  "
                         f"{b.first}..{b.last}")
            for name in b.values[1:]:
                p = self.values[name]
                how = f"in place of %{p.in_place_of}" if p.kind == "in_place" else f"view of %{p.alias_of}"
                lines.append(f"      %{name} ({how}), live {p.first}..{p.last}")
        if self.buckets:
            lines.append("  all-reduce buckets:")
            lines += describe_buckets(self.buckets, self.buffers)
        views = [p for p in self.values.values() if p.kind == "view" and p.offset is None]
        if views:
            lines.append("  views of arguments: " + ", ".join(f"%{p.value} of %{p.alias_of}" for p in views))
        return "\n".join(lines)


_ROLES: weakref.WeakKeyDictionary[Node, str] = weakref.WeakKeyDictionary()


def role(n: Node) -> str:
    """The node's fusion role (ir/registry.py), remembered per node (the planner asks often)."""
    if n not in _ROLES:
        _ROLES[n] = _op_role(n)
    return _ROLES[n]


# -- the schedule ---------------------------------------------------------------------------------
def units(g: Graph) -> list[tuple[Node, ...]]:
    """The steps of ``g`` in graph order: runs of nodes with one ``kernel``, and single nodes
    (kernel-less ones, and every node of an unfused graph)."""
    out: list[list[Node]] = []
    for n in g.nodes:
        if n.kernel is not None and out and out[-1][0].kernel == n.kernel:
            out[-1].append(n)
        else:
            out.append([n])
    return [tuple(u) for u in out]


def _step_name(nodes: tuple[Node, ...]) -> str:
    n = nodes[0]
    if n.kernel is not None:
        return n.kernel
    return f"%{n.outputs[0].name}" if role(n) in ("immediate", "view") else f"{n.op} %{n.outputs[0].name}"


class _Values:
    """What the planner and the scheduler ask of the values of ``g`` run as ``steps``."""

    def __init__(self, g: Graph, bindings: dict[str, int], steps: list[tuple[Node, ...]], target: str = "cpu"):
        self.g = g
        self.gemm = gemm_target(target).gemm
        self._nbytes: dict[Value, int] = {}
        self.bindings = bindings  # one size per batch symbol
        self.unit_of = {n: i for i, u in enumerate(steps) for n in u}
        self.producer = g.producers()
        self.users = {v: [u for u in us if role(u) != "immediate"]  # immediates read shapes, not memory
                      for v, us in g.users().items()}
        self.to_end = set(g.outputs) | {new for _, new in g.updates}
        self.update_of = {}
        for old, new in g.updates:
            self.update_of.setdefault(new, old)

    def nbytes(self, v: Value) -> int:
        if v not in self._nbytes:
            self._nbytes[v] = v.type.nbytes(self.bindings)
        return self._nbytes[v]

    def source(self, v: Value) -> Value:
        """The value whose storage ``v`` uses when in-place is left aside (follows views)."""
        while v in self.producer and role(self.producer[v]) == "view":
            v = self.producer[v].inputs[0]
        return v

    def stored(self, v: Value) -> bool:
        """Whether ``v`` is written to memory by the node computing it."""
        n = self.producer.get(v)
        if n is None or not _materialized(n):
            return False
        if role(n) == "gemm" and self.gemm.product_in_memory:  # BLAS: the product lies in memory before
            return True  # the epilogue reads it
        return v in self.to_end or any(self.unit_of[u] != self.unit_of[n] for u in self.users[v])


def _materialized(n: Node) -> bool:
    return role(n) not in ("immediate", "view")


# -- planning one schedule -------------------------------------------------------------------------
class _Storage:
    def __init__(self, name: str, nbytes: int, first: int, arena: bool):
        self.name, self.nbytes, self.first, self.arena = name, nbytes, first, arena
        self.values: list[Value] = []
        self.last = first


class _Planner:
    def __init__(self, g: Graph, bindings: dict[str, int], order: list[tuple[Node, ...]], target: str = "cpu"):
        self.g, self.bindings, self.order = g, bindings, order
        self.facts = _Values(g, bindings, order, target)
        self.storage: dict[Value, _Storage] = {}
        self.placements: dict[str, Placement] = {}
        self.update_why: dict[Value, str] = {}

    def last_read(self, v: Value, first: int) -> int:
        f = self.facts
        if v in f.to_end:
            return len(self.order) - 1
        return max((f.unit_of[u] for u in f.users[v]), default=first)

    def place(self, v: Value, s: _Storage, kind: str, first: int, **links) -> None:
        s.values.append(v)
        s.last = max(s.last, self.last_read(v, first))
        self.storage[v] = s
        self.placements[v.name] = Placement(v.name, v.type, kind, self.facts.nbytes(v), first,
                                            self.last_read(v, first), s.name, None, **links)

    def plan(self, name: str) -> MemoryPlan:
        for _, v in self.g.args:
            self.place(v, _Storage(v.name, self.facts.nbytes(v), -1, arena=False), "arg", -1)
        for i, step in enumerate(self.order):
            self.position = {m: k for k, m in enumerate(step)}
            self.readers: dict[_Storage, list[tuple[Node, Value]]] = {}  # storage read by the step, and how
            for m in step:
                for x in dict.fromkeys(m.inputs):
                    if x in self.storage:
                        self.readers.setdefault(self.storage[x], []).append((m, x))
            for n in step:
                for v in n.outputs:
                    self.classify(v, n, i, step)
        return self.finish(name)

    def classify(self, v: Value, n: Node, i: int, step: tuple[Node, ...]) -> None:
        f = self.facts
        r = role(n)
        if r == "view" and n.inputs[0] in self.storage:
            self.place(v, self.storage[n.inputs[0]], "view", i, alias_of=n.inputs[0].name)
        elif r in ("immediate", "view"):
            self.placements[v.name] = Placement(v.name, v.type, "immediate", f.nbytes(v))
        elif not f.stored(v):
            self.placements[v.name] = Placement(v.name, v.type, "register", f.nbytes(v), i, i)
        else:
            for cand in self.candidates(v, step):
                why = self.why_not_in_place(v, n, i, step, self.storage[cand])
                if cand is f.update_of.get(v):
                    self.update_why[v] = why or f"in place ({_step_name(step)})"
                if why is None:
                    self.place(v, self.storage[cand], "in_place", i, in_place_of=cand.name)
                    return
            self.place(v, _Storage(v.name, f.nbytes(v), i, arena=True), "arena", i)

    def candidates(self, v: Value, step: tuple[Node, ...]) -> list[Value]:
        """Storage ``v`` may take over: its update's argument, then the arena buffers its kernel reads."""
        out = [self.facts.update_of[v]] if v in self.facts.update_of else []
        taken = {self.storage[c] for c in out}
        return out + [readers[0][1] for s, readers in self.readers.items() if s.arena and s not in taken]

    def why_not_in_place(self, y: Value, n: Node, i: int, step: tuple[Node, ...], s: _Storage) -> str | None:
        """None if ``y`` (written by ``n`` at step ``i``) may overwrite storage ``s``, else why not."""
        f = self.facts
        here = _step_name(step)
        if s.nbytes != f.nbytes(y):
            return f"%{s.name} has {s.nbytes:,} B, %{y.name} {f.nbytes(y):,} B"
        if not s.arena and y in f.g.outputs:  # the runtime returns outputs in arrays of their own
            return f"%{y.name} is a graph output, returned in an array of its own"
        for x in s.values:
            if x in f.to_end:
                return f"%{x.name} is a graph output" if x in f.g.outputs else \
                    f"%{x.name} is itself an update's new value"
        if s.last > i:
            x, u = max(((x, u) for x in s.values for u in f.users[x]), key=lambda xu: f.unit_of[xu[1]])
            return (f"%{x.name} is read by {_step_name(self.order[f.unit_of[u]])} (step {f.unit_of[u]}) after "
                    f"{here} (step {i}) writes %{y.name}")
        position, readers = self.position, self.readers.get(s, [])
        if not readers:
            return None
        if not (_aligned(n, y, None) or any(_aligned(n, y, x) for x in n.inputs if self.storage.get(x) is s)):
            return f"{here} reads %{s.name} and computes %{y.name} with {n.op}, not elementwise"
        for m, x in readers:
            if position[m] > position[n]:
                return f"in {here}, {m.op} %{m.outputs[0].name} reads %{x.name} after %{y.name} is written"
            if not _aligned(m, y, x, n):
                return f"{here} reads %{x.name} in {m.op} %{m.outputs[0].name}, not at the index it writes"
            for d in self.descendants(m, x, step):
                if not _aligned(d, y, None):
                    return f"in {here}, %{x.name} flows into {d.op} %{d.outputs[0].name}, not elementwise"
        return None

    def descendants(self, m: Node, x: Value, step: tuple[Node, ...]) -> list[Node]:
        """Nodes of ``step`` computed from what ``m`` reads of ``x``."""
        pairs = get_op(m.op).aligned  # output k read from operand j only at the index it writes
        aligned = [v for k, v in enumerate(m.outputs) if k in pairs and m.inputs[pairs[k]] is x]
        outs = m.outputs if role(m) == "elementwise" else aligned
        inside, out, stack = set(step), [], list(outs)
        while stack:
            for u in self.facts.users[stack.pop()]:
                if u in inside and u not in out:
                    out.append(u)
                    stack.extend(u.outputs)
        return out

    def finish(self, name: str) -> MemoryPlan:
        f = self.facts
        storages = list(dict.fromkeys(self.storage.values()))
        buffers = [Buffer(s.name, s.values[0].type, s.nbytes, s.first, s.last, 0, [v.name for v in s.values])
                   for s in storages if s.arena]
        arena = {s for s in storages if s.arena}
        groups = bucket_members(self.g, lambda v: self.storage[v].name if self.storage.get(v) in arena else None)
        peak = assign_with_buckets(buffers, groups, assign_offsets)
        offsets = {b.name: b.offset for b in buffers}
        values = {}
        for v in self.g.values():
            p = self.placements[v.name]
            if p.storage in offsets:
                p = dataclasses.replace(p, offset=offsets[p.storage])
            values[v.name] = p
        steps = [Step(i, _step_name(u), u) for i, u in enumerate(self.order)]
        change = [0] * (len(steps) + 1)  # the bytes of buffers born minus those dead, at each step
        for b in buffers:
            if max(b.first, 0) <= min(b.last, len(steps) - 1):
                change[max(b.first, 0)] += b.nbytes
                change[min(b.last, len(steps) - 1) + 1] -= b.nbytes
        lower = max(itertools.accumulate(change[:-1]), default=0)
        no_reuse = sum(p.nbytes for p in values.values() if p.kind in ("arena", "in_place"))
        updates = []
        for old, new in self.g.updates:
            p = values[new.name]
            in_place = p.kind == "in_place" and p.in_place_of == old.name
            if in_place:
                why = self.update_why.get(new, "in place")
            elif f.update_of[new] is not old:
                why = f"not in place: %{new.name} is also the new value of %{f.update_of[new].name}; copied " \
                      f"into %{old.name} at the end"
            elif new in self.update_why:
                why = f"not in place: {self.update_why[new]}; copied into %{old.name} at the end"
            else:
                why = f"not in place: %{new.name} is {_kind_words(p)}; copied into %{old.name} at the end"
            updates.append(UpdatePlan(old.name, new.name, in_place, why))
        return MemoryPlan(self.g.name, None, steps, values, buffers, updates, peak, no_reuse, lower, name,
                          sizes=dict(self.bindings), buckets=groups)


def _kind_words(p: Placement) -> str:
    return {"view": f"a view of %{p.alias_of}", "arg": "an argument", "immediate": "an immediate",
            "in_place": f"in place of %{p.in_place_of}"}.get(p.kind, "computed out of place")


def _aligned(m: Node, y: Value, x: Value | None, writer: Node | None = None) -> bool:
    """Whether node ``m`` reads ``x`` (or, with ``x`` None, its operands) only at the element index
    of ``y``: elementwise over ``y``'s shape with ``x`` not broadcast, or a declared aligned operand."""
    if writer is None or m is writer:
        for k, v in enumerate(m.outputs):
            j = get_op(m.op).aligned.get(k)
            if j is not None and m.inputs[j] is x and v is y:
                return True
    if role(m) != "elementwise" or m.outputs[0].type.shape != y.type.shape:
        return False
    return x is None or x.type.shape == y.type.shape


# -- offsets ---------------------------------------------------------------------------------------
def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _first_fit(buffers: list[Buffer], order: list[Buffer], live_with: dict[int, list[Buffer]]) -> int:
    placed: set[int] = set()
    for b in order:
        busy = sorted((p for p in live_with[id(b)] if id(p) in placed), key=lambda p: p.offset)
        offset = 0
        for p in busy:
            if offset + b.nbytes <= p.offset:
                break
            offset = max(offset, _align(p.offset + p.nbytes))
        b.offset = offset
        placed.add(id(b))
    return max((b.offset + b.nbytes for b in buffers), default=0)


def _live_with(buffers: list[Buffer]) -> dict[int, list[Buffer]]:
    """For each buffer (by id), the other buffers of some bytes live at a common step (none for an
    empty buffer, which goes at offset 0): a sweep in order of birth."""
    out: dict[int, list[Buffer]] = {id(b): [] for b in buffers}
    by_first = sorted((b for b in buffers if b.nbytes), key=lambda b: b.first)
    for i, a in enumerate(by_first):
        for c in by_first[i + 1:]:
            if c.first > a.last:
                break
            if a.live_with(c):
                out[id(a)].append(c)
                out[id(c)].append(a)
    return out


def assign_offsets(buffers: list[Buffer]) -> int:
    """Offsets for ``buffers`` (64-byte aligned); returns the arena size. Buffers live at a common
    step never overlap. First fit over a few orders (largest first, longest-lived first, by
    birth); the smallest arena wins."""
    orders = [sorted(buffers, key=lambda b: (-b.nbytes, b.first, b.name)),
              sorted(buffers, key=lambda b: (-(b.last - b.first), -b.nbytes, b.first)),
              sorted(buffers, key=lambda b: (b.first, -b.nbytes))]
    live_with = _live_with(buffers)
    best, best_peak = None, None
    for order in orders:
        peak = _first_fit(buffers, order, live_with)
        if best_peak is None or peak < best_peak:
            best, best_peak = {b.name: b.offset for b in buffers}, peak
    for b in buffers:
        b.offset = best[b.name]
    return best_peak or 0


# -- choosing a schedule ---------------------------------------------------------------------------
class _Scheduler:
    """Topological orders of the steps that run next the step growing live memory least (frees
    the most), ties in graph order. Updates in ``keep`` get write-after-read edges: every reader
    of the argument runs before the step writing its new value, so the update can be in place."""

    def __init__(self, g: Graph, bindings: dict[str, int], steps: list[tuple[Node, ...]], target: str = "cpu"):
        self.g, self.steps = g, steps
        f = self.facts = _Values(g, bindings, steps, target)
        self.deps: dict[int, set[int]] = {i: set() for i in range(len(steps))}
        for i, u in enumerate(steps):
            for n in u:
                self.deps[i].update(f.unit_of[f.producer[v]] for v in n.inputs if v in f.producer)
            self.deps[i].discard(i)
        self.readers: dict[Value, set[int]] = {}  # storage source -> steps reading it
        for v, us in f.users.items():
            self.readers.setdefault(f.source(v), set()).update(f.unit_of[u] for u in us)
        self.created = {i: [v for n in u for v in n.outputs if f.stored(v)] for i, u in enumerate(steps)}
        self.reads: dict[int, set[Value]] = {i: set() for i in range(len(steps))}
        for src, rs in self.readers.items():
            for i in rs:
                self.reads[i].add(src)
        self.stored = {src for vs in self.created.values() for src in vs}
        self.updaters: dict[Value, set[int]] = {}  # an updated argument -> the steps writing its new value
        for i, vs in self.created.items():
            for v in vs:
                if v in f.update_of:
                    self.updaters.setdefault(f.update_of[v], set()).add(i)
        self.after: list[list[int]] = [[] for _ in steps]  # the steps depending on each
        for i, d in self.deps.items():
            for j in d:
                self.after[j].append(i)
        self.n_readers = {src: len(rs) for src, rs in self.readers.items()}
        # what ``order`` scores a step by: the bytes it writes (with the argument each update writes,
        # and whether the step reads that argument itself) and the bytes it may free
        self.grows = [[(f.nbytes(v), f.update_of.get(v), int(i in self.readers.get(f.update_of.get(v), ())))
                       for v in self.created[i]] for i in range(len(steps))]
        self.frees = [[(src, f.nbytes(src)) for src in self.reads[i] if src not in f.to_end] for i in range(len(steps))]

    def writer(self, update: tuple[Value, Value]) -> int | None:
        p = self.facts.producer.get(update[1])
        return None if p is None else self.facts.unit_of[p]

    def constraining(self) -> list[tuple[Value, Value]]:
        """Updates whose write-after-read edges may order their step after some reader it does not
        depend on anyway."""
        out = []
        for upd in self.g.updates:
            w = self.writer(upd)
            if w is not None and any(not _reaches(self.deps, r, w) for r in self.readers.get(upd[0], ()) - {w}):
                out.append(upd)
        return out

    def worth_relaxing(self, upd: tuple[Value, Value]) -> bool:
        """Whether running the update's step earlier could free more than its value costs: it reads
        buffers (activations) bigger than the new value, which then waits in the arena."""
        f, w = self.facts, self.writer(upd)
        freed = sum(f.nbytes(src) for src in self.reads[w] if src in self.stored and src not in f.to_end)
        return freed > f.nbytes(upd[1])

    def war_edges(self, updates: list[tuple[Value, Value]]) -> dict[tuple[Value, Value], list[tuple[int, int]]]:
        """(reader, writer) edges per update, added in turn where they make no cycle."""
        deps = {i: set(d) for i, d in self.deps.items()}
        out = {}
        for upd in updates:
            w, out[upd] = self.writer(upd), []
            for r in sorted(self.readers.get(upd[0], ()) - {w}):
                if not _reaches(deps, w, r):
                    deps[w].add(r)
                    out[upd].append((r, w))
        return out

    def order(self, keep: list[tuple[Value, Value]], war: dict[tuple[Value, Value], list[tuple[int, int]]],
              like: _Order | None = None) -> _Order:
        """The greedy order keeping the write-after-read edges of the updates in ``keep``, and its
        estimated cost. ``like``: an order made with other edges, whose first steps this one shares
        up to the first step whose readiness the edges change: the run resumes from its checkpoint
        there (a local search toggles one update at a time: most of an order is shared)."""
        n, grows, frees = len(self.steps), self.grows, self.frees
        edges = {e for upd in keep for e in war[upd] if e[0] not in self.deps[e[1]]}
        waiting = [len(self.deps[i]) for i in range(n)]
        also: dict[int, list[int]] = {}  # the steps waiting for each besides self.after's
        for r, w in edges:
            waiting[w] += 1
            also.setdefault(r, []).append(w)
        if like is None:  # per storage source, its readers not done yet; the stored values written
            checkpoints = [(dict(self.n_readers), set(), 0, 0, 0)]
        else:
            checkpoints = like.checkpoints[:self._shared(like, edges) // CHECKPOINT + 1]
        order = like.steps[:(len(checkpoints) - 1) * CHECKPOINT] if like is not None else []
        pending, live, now, peak, in_place = checkpoints[-1]  # live bytes, their most, updates in place
        pending, live = dict(pending), set(live)
        for i in order:
            for u in (*self.after[i], *also.get(i, ())):
                waiting[u] -= 1

        # a step not done is among the pending readers of what it reads: ``pending[src] - own`` counts the others
        def grown(i: int) -> int:
            return sum(b for b, arg, own in grows[i] if arg is None or pending.get(arg, 0) > own)

        def freed(i: int) -> int:
            return sum(b for src, b in frees[i] if pending[src] == 1 and src in live)

        # each ready step's score, kept until a step done changes what it depends on: the pending
        # readers of a live value it reads or of the argument it updates; the smallest (score, step)
        # is the heap's first entry that is still current
        done = set(order)
        ready = {i for i in range(n) if not waiting[i] and i not in done}
        score = {i: grown(i) - freed(i) for i in ready}
        heap = [(s, i) for i, s in score.items()]
        heapq.heapify(heap)
        while ready:
            if len(order) == len(checkpoints) * CHECKPOINT:
                checkpoints.append((dict(pending), set(live), now, peak, in_place))
            s, best = heapq.heappop(heap)
            if best not in ready or score[best] != s:
                continue
            ready.remove(best)
            order.append(best)
            in_place += sum(1 for _, arg, own in grows[best] if arg is not None and pending.get(arg, 0) <= own)
            now += grown(best)
            peak = max(peak, now)
            now -= freed(best)
            for src in self.reads[best]:
                pending[src] -= 1
            live.update(v for v in self.created[best] if v in pending)
            stale = set()  # the ready steps reading a live value it read or wrote, or updating what it read
            for src in self.reads[best]:
                if src in live:
                    stale.update(self.readers[src])
                stale.update(self.updaters.get(src, ()))
            for v in self.created[best]:
                stale.update(self.readers.get(v, ()))
            for u in (*self.after[best], *also.get(best, ())):
                waiting[u] -= 1
                if not waiting[u]:
                    ready.add(u)
                    stale.add(u)
            for i in stale.intersection(ready):
                score[i] = grown(i) - freed(i)
                heapq.heappush(heap, (score[i], i))
        assert len(order) == n, "the step dependencies have a cycle"
        return _Order(order, (peak, -in_place), edges, checkpoints)

    def _shared(self, like: _Order, edges: set[tuple[int, int]]) -> int:
        """How many first steps the order with write-after-read ``edges`` has in common with ``like``
        for sure: until ``like`` runs a step that now waits for a later one, or a step may be
        ready sooner. Before that the ready steps are the same but for ones the greedy did not pick."""
        pos = {s: t for t, s in enumerate(like.steps)}
        shared = len(pos)
        for r, w in edges - like.edges:
            if pos[r] > pos[w]:
                shared = min(shared, pos[w])

        def ready_at(w: int, es: set[tuple[int, int]]) -> int:
            return 1 + max([pos[d] for d in self.deps[w]] + [pos[r] for r, x in es if x == w], default=-1)

        for w in {w for _, w in like.edges - edges}:
            if ready_at(w, edges) < ready_at(w, like.edges):
                shared = min(shared, ready_at(w, edges))
        return shared


@dataclass
class _Order:
    """A greedy schedule: the steps in order, its cost (most bytes live, minus the updates in place),
    the write-after-read edges it kept, and its state every ``CHECKPOINT`` steps (pending readers,
    live values, live bytes, their most, updates in place) for orders that share its first steps."""

    steps: list[int]
    cost: tuple[int, int]
    edges: set[tuple[int, int]]
    checkpoints: list[tuple[dict, set, int, int, int]]


def _reaches(deps: dict[int, set[int]], a: int, b: int) -> bool:
    """Whether step ``b`` depends (transitively) on step ``a``."""
    stack, seen = [b], set()
    while stack:
        i = stack.pop()
        if i == a:
            return True
        if i not in seen:
            seen.add(i)
            stack.extend(deps[i])
    return False


def symbol_sizes(g: Graph, batch: int = 256, sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """The size of every batch symbol of ``g``: its entry in ``sizes``, else ``batch``."""
    sizes = sizes or {}
    return {s: int(sizes.get(s, batch)) for v in g.values() for s in sorted(v.type.symbols)}


def plan_memory(g: Graph, batch: int = 256, reorder: bool = True, sizes: Mapping[str, int] | None = None,
                target: str = "cpu") -> MemoryPlan:
    """Plan the memory of ``g`` at batch size ``batch``; ``plan.steps`` is the order to run.

    ``sizes`` binds batch symbols one by one (``{"N": 32, "T": 128}``: a model with a batch and a
    sequence dimension); a symbol it leaves out has size ``batch``.

    With ``reorder``, a memory-aware schedule keeping every update in place is tried besides the
    graph's order, then each update's write-after-read order is given up in turn where that
    shrinks the arena (an update out of place costs its size; the activation it kept alive, more).
    The smallest arena wins, then the most updates in place, then graph order."""
    steps = units(g)
    bindings = symbol_sizes(g, batch, sizes)
    common = set(bindings.values()) or {batch}

    def plan(order: list[int], name: str) -> MemoryPlan:
        order = bucket_order(steps, order)  # a data-parallel step: all-reduces overlap the backward
        p = _Planner(g, bindings, [steps[i] for i in order], target).plan(name)
        p.batch = next(iter(common)) if len(common) == 1 else None  # one size for every symbol: the batch
        return p

    plans = [plan(list(range(len(steps))), "graph order")]
    if reorder:
        sched = _Scheduler(g, bindings, steps, target)
        updates = sched.constraining()
        war = sched.war_edges(updates)
        plans.append(plan(sched.order(updates, war).steps, "memory-aware order keeping updates in place"))
        always = [u for u in updates if not sched.worth_relaxing(u)]
        free = [u for u in updates if sched.worth_relaxing(u)]
        trials = MAX_TRIALS
        for start in (free, []):  # local search from both ends: give up or restore one order at a time
            keep = list(start)
            best = sched.order(always + keep, war)
            improved = True
            while improved and trials > 0:
                improved = False
                for upd in free[:trials]:
                    trials -= 1
                    trial_keep = [u for u in free if (u in keep) != (u is upd)]
                    trial = sched.order(always + trial_keep, war, like=best)
                    if trial.cost < best.cost:
                        keep, best, improved = trial_keep, trial, True
            candidate = plan(best.steps, "memory-aware order")
            if all(_cost(candidate) != _cost(p) for p in plans):
                plans.append(candidate)
    chosen = min(plans, key=_cost)
    chosen.considered = [(p.schedule, p.peak, len(p.in_place_updates)) for p in plans]
    return chosen


def _cost(p: MemoryPlan) -> tuple[int, int]:
    return p.peak, -len(p.in_place_updates)


def scheduled(g: Graph, plan: MemoryPlan) -> Graph:
    """``g`` with its nodes in the plan's order (``g`` itself when the order is unchanged)."""
    nodes = [n for s in plan.steps for n in s.nodes]
    if nodes == g.nodes:
        return g
    b = GraphBuilder.extend(Graph(g.name, g.args, [], g.outputs, g.updates))
    for n in nodes:
        b.add_node(n)
    return b.finish(g.outputs, g.updates)


@register_pass
@dataclass(frozen=True)
class MemoryPlanPass(Pass):
    """Plan buffers, in-place updates and arena offsets; the graph comes back in the plan's order."""

    name = "memory-plan"
    batch: int = 256  # the batch size N the arena is sized for
    reorder: bool = True  # try memory-aware schedules besides the graph's order
    target: str = "cpu"  # whose GEMM capabilities decide what is stored (codegen/targets.py)

    def run(self, graph: Graph) -> PassResult:
        plan = plan_memory(graph, self.batch, self.reorder, target=self.target)
        return PassResult(scheduled(graph, plan), plan.render(), plan)
