"""Fusion: group the nodes of a graph into kernels, and explain every decision.

A kernel has at most one *anchor* — a GEMM (matmul), a reduction (sum/mean/max) or a row op
(softmax, layer_norm, cross-entropy, batch-norm statistics, their backward ops) — plus
elementwise ops over the anchor's iteration space: a *prologue* over its input (reductions
and row ops only: BLAS reads its operands from memory) and an *epilogue* over its output
(bias, activation, residual add, optimizer update). Kernels without an anchor are elementwise
chains over one shape, with broadcast operands.

Decisions follow bytes moved: a node joins the neighbouring kernel that saves the most memory
traffic among those where it is legal; the report lists every producer→consumer pair between
two different kernels with the reason in plain words, and the traffic before and after.
Scalar constants and ``count`` are immediates (no kernel); ``reshape`` is a view (no kernel).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from gradfuse.codegen.targets import target as gemm_target
from gradfuse.ir.graph import Graph, GraphBuilder, Node, Value
from gradfuse.ir.registry import role

from .manager import Pass, PassResult, register_pass


def materialized(n: Node) -> bool:
    return role(n) not in ("immediate", "view")


@dataclass(eq=False)
class Group:
    nodes: list[Node]
    anchors: list[Node]  # the GEMM / reduction / row op(s); row ops over the same rows may share a kernel
    prologue_space: tuple | None  # the shape the anchor reads (None: no prologue allowed)
    epilogue_space: tuple  # the shape of the kernel's elementwise tail
    name: str = ""

    @property
    def anchor(self) -> Node | None:
        return self.anchors[0] if self.anchors else None

    @property
    def kind(self) -> str:
        if self.anchor is None:
            return "elementwise" if role(self.nodes[0]) == "elementwise" else role(self.nodes[0])
        return role(self.anchor)


def _new_group(n: Node) -> Group:
    r = role(n)
    out = n.outputs[0].type.shape
    if r in ("reduction", "row"):
        return Group([n], [n], n.inputs[0].type.shape, out)
    if r in ("gemm", "layout"):
        return Group([n], [n], None, out)
    return Group([n], [], out if r == "elementwise" else None, out)


class Fuser:
    def __init__(self, g: Graph, batch: int, target: str = "cpu"):
        self.g, self.batch = g, batch
        self.target = gemm_target(target)
        self.producer = g.producers()
        self.users = g.users()
        self.position = {n: i for i, n in enumerate(g.nodes)}
        self._firsts: dict[Group, tuple[int, int]] = {}  # group -> (its nodes seen, their first position)
        self.group_of: dict[Node, Group] = {}
        self.groups: list[Group] = []
        self.decisions: dict[tuple[int, Node], str] = {}  # (producer group, consumer) -> why not fused
        self.immediates = {v for n in g.nodes if role(n) == "immediate" for v in n.outputs}
        self.graph_outputs = set(g.outputs) | {new for _, new in g.updates}

    def nbytes(self, v: Value) -> int:
        return v.type.nbytes({s: self.batch for s in v.type.symbols})

    # -- legality: the one place that decides whether a node may join a group ----------------
    def why_not(self, n: Node, grp: Group) -> str | None:
        """None if ``n`` may join ``grp``, else the reason in plain words."""
        r = role(n)
        if not materialized(n):
            return f"{n.op} needs no kernel"
        if grp.kind == "opaque" or r == "opaque":
            op = n.op if r == "opaque" else grp.nodes[0].op
            return f"{op} writes its output in its own kernel (a scatter or an overwrite: nothing fuses with it)"
        if r == "layout":
            return f"{n.op} moves data from memory: elementwise work may follow it in its kernel, not precede it"
        shape = n.outputs[0].type.shape
        if r == "gemm" and not self.target.gemm.prologue:
            return f"a GEMM on the {self.target.name} backend reads its operands from memory (BLAS): no prologue"
        if grp.kind == "gemm" and r == "elementwise" and not self.target.gemm.epilogue:
            return f"a GEMM on the {self.target.name} backend takes no epilogue"
        if r in ("reduction", "row"):
            if grp.anchor is not None and not self._same_rows(n, grp):
                # what n reduces is its operand's producer in the group (an epilogue node, a later
                # anchor), not necessarily the group's first anchor
                p = next((p for v in n.inputs if (p := self.producer.get(v)) is not None
                          and self.group_of.get(p) is grp), None)
                if p is None:  # a sibling row op: it shares an input with the group, not a producer
                    return (f"{n.op} cannot share the rows of %{n.inputs[0].name}: the kernel's {grp.anchor.op} "
                            f"%{grp.anchor.outputs[0].name} is not a row op over them (an epilogue is elementwise)")
                return (f"{n.op} reduces the output of {p.op} %{p.outputs[0].name}, which "
                        "ends the kernel: an epilogue is elementwise")
            if grp.prologue_space != n.inputs[0].type.shape:
                return f"iteration spaces differ: the kernel runs over {_fmt(grp.prologue_space)}, {n.op} reads " \
                       f"{_fmt(n.inputs[0].type.shape)}"
            return self._cycle_reason(n, grp)
        # elementwise: in the prologue if it can run before the anchor, else in the epilogue
        if grp.anchor is None or (shape == grp.epilogue_space and not self._feeds_anchor(n, grp)):
            if grp.anchor is None and shape != grp.epilogue_space:
                return f"iteration spaces differ: {n.op} runs over {_fmt(shape)}, the kernel over " \
                       f"{_fmt(grp.epilogue_space)}"
            return self._cycle_reason(n, grp)
        if shape == grp.prologue_space and not self._after_anchor(n, grp):
            return self._cycle_reason(n, grp)
        if self._after_anchor(n, grp):
            return (f"a reduction boundary: {n.op} runs over {_fmt(shape)} but the kernel's "
                    f"{grp.anchor.op} produces {_fmt(grp.epilogue_space)}")
        spaces = {_fmt(s) for s in (grp.prologue_space, grp.epilogue_space) if s is not None}
        return f"iteration spaces differ: {n.op} runs over {_fmt(shape)}, the kernel over {' / '.join(sorted(spaces))}"

    def _same_rows(self, n: Node, grp: Group) -> bool:
        """Row ops reading the same tensor can share one pass over its rows (cross-entropy and
        its gradient, say): horizontal fusion of anchors."""
        return role(n) == "row" and all(role(a) == "row" and a.inputs[0] is n.inputs[0] for a in grp.anchors)

    def _feeds_anchor(self, n: Node, grp: Group) -> bool:
        """Whether an anchor of ``grp`` reads ``n`` (directly or through the group)."""
        targets = set(grp.anchors)
        stack, seen = [u for v in n.outputs for u in self.users[v]], set()
        while stack:
            u = stack.pop()
            if u in targets:
                return True
            if u in seen or self.group_of.get(u) is not grp:
                continue
            seen.add(u)
            stack.extend(w for v in u.outputs for w in self.users[v])
        return False

    def _after_anchor(self, n: Node, grp: Group) -> bool:
        """Whether ``n`` depends on the group's anchor (so it belongs in the epilogue)."""
        seen, stack = set(), [v for v in n.inputs]
        while stack:
            v = stack.pop()
            p = self.producer.get(v)
            if p is None or p in seen or self.group_of.get(p) is not grp:
                continue
            if p in grp.anchors:
                return True
            seen.add(p)
            stack.extend(p.inputs)
        return False

    def _cycle_reason(self, n: Node, grp: Group) -> str | None:
        """Joining is illegal if ``n`` depends on ``grp`` through another kernel, or through a node
        outside every kernel (a view, or a ``count`` of a value the kernel computes: the schedule
        runs it between kernels, so it would have to come both after and before this one)."""
        stack: list[tuple[Node, Node | None]] = [(self.producer[v], None) for v in n.inputs if v in self.producer]
        seen: set[tuple[Node, bool]] = set()
        independent: set[Group] = set()  # the other kernels found not to depend on grp
        while stack:
            p, via = stack.pop()  # via: the first node outside ``grp`` on the path from n to p
            if (p, via is None) in seen:
                continue
            seen.add((p, via is None))
            pg = self.group_of.get(p)
            if pg is grp:
                if via is not None and self.group_of.get(via) is None:
                    return (f"it needs %{via.outputs[0].name} ({via.op}, outside every kernel), which reads "
                            f"%{p.outputs[0].name} of this kernel (fusing would create a cycle)")
                continue
            if pg is not None and pg not in independent:
                if self._depends_on(pg, grp):
                    return (f"it needs %{p.outputs[0].name}, computed by another kernel that depends on this one "
                            "(fusing would create a cycle)")
                independent.add(pg)
            stack.extend((self.producer[v], via or p) for v in p.inputs if v in self.producer)
        return None

    def _first(self, grp: Group) -> int:
        """The position of the group's first node; groups only grow, so it is updated from the nodes added."""
        seen, lo = self._firsts.get(grp, (0, len(self.g.nodes)))
        if seen < len(grp.nodes):
            lo = min(lo, min(self.position[n] for n in grp.nodes[seen:]))
            self._firsts[grp] = (len(grp.nodes), lo)
        return lo

    def _depends_on(self, a: Group, b: Group) -> bool:
        """Whether a node of ``a`` reads, through any path, a node of ``b``. Nodes come in topological
        order, so nothing before ``b``'s first node can lead to ``b``: the search stops there (on a
        12-layer transformer's training step this took the pass from ~22 s to a fraction)."""
        lo = self._first(b)
        stack, seen = [n for n in a.nodes if self.position[n] > lo], set()
        while stack:
            node = stack.pop()
            for v in node.inputs:
                p = self.producer.get(v)
                if p is None or p in seen or self.position[p] < lo:
                    continue
                if self.group_of.get(p) is b:
                    return True
                seen.add(p)
                stack.append(p)
        return False

    # -- the greedy pass ----------------------------------------------------------------------
    def saving(self, n: Node, grp: Group) -> int:
        """Bytes of memory traffic saved by running ``n`` in ``grp``: each operand it takes from
        the group is not re-read (and not written at all once no outside user is left)."""
        saved = 0
        for v in dict.fromkeys(n.inputs):
            p = self.producer.get(v)
            if p is not None and self.group_of.get(p) is grp:
                outside = [u for u in self.users[v] if u is not n and self.group_of.get(u) is not grp]
                saved += self.nbytes(v) * (1 if outside or v in self.graph_outputs else 2)
            elif v not in self.immediates and any(self.group_of.get(u) is grp for u in self.users[v]):
                saved += self.nbytes(v)  # read once for both
        return saved

    def run(self) -> None:
        for n in self.g.nodes:
            if not materialized(n):
                continue
            candidates, reasons = [], {}
            producers = [self.producer.get(v) for v in n.inputs]
            # row ops may also share a pass over their input with a sibling row op
            siblings = [u for u in self.users.get(n.inputs[0], []) if u is not n] if role(n) == "row" else []
            for p in producers + siblings:
                grp = self.group_of.get(p) if p is not None else None
                if grp is None or grp in candidates or grp in reasons:
                    continue
                why = self.why_not(n, grp)
                if why is None:
                    candidates.append(grp)
                else:
                    reasons[grp] = why
            if candidates:  # the most bytes saved; on a tie, the kernel with a GEMM or reduction
                best = max(candidates, key=lambda grp: (self.saving(n, grp), grp.anchor is not None))
                for grp in candidates:
                    if grp is not best:
                        reasons[grp] = (f"it joined the kernel of %{best.nodes[0].outputs[0].name} instead, saving "
                                        f"{self.saving(n, best):,} B (here: {self.saving(n, grp):,} B)")
                best.nodes.append(n)
                if role(n) in ("reduction", "row"):
                    best.anchors.append(n)
                    best.epilogue_space = n.outputs[0].type.shape
                self.group_of[n] = best
            else:
                grp = _new_group(n)
                self.groups.append(grp)
                self.group_of[n] = grp
            for grp, why in reasons.items():
                self.decisions[(id(grp), n)] = why
        self._merge_elementwise_groups()

    def _merge_elementwise_groups(self) -> None:
        """Merge anchor-less elementwise groups into a neighbouring kernel where legal (e.g. the
        optimizer's momentum decay, which reads only state, into the GEMM computing the gradient)."""
        changed = True
        while changed:
            changed = False
            for small in [grp for grp in self.groups if grp.anchor is None and grp.kind == "elementwise"]:
                for other in self._neighbours(small):
                    if other is small or other.kind == "opaque":
                        continue
                    if all(self._why_not_moved(n, other) is None for n in small.nodes) and \
                            not self._reaches_through_others(small, other):  # once for the group, checked last: slower
                        for n in small.nodes:
                            other.nodes.append(n)
                            self.group_of[n] = other
                        self.groups.remove(small)
                        changed = True
                        break
                if changed:
                    break

    def _why_not_moved(self, n: Node, dst: Group) -> str | None:
        src = self.group_of[n]
        self.group_of[n] = None  # judge n as if it were not yet placed
        try:
            return self.why_not(n, dst)
        finally:
            self.group_of[n] = src

    def _reaches_through_others(self, src: Group, dst: Group) -> bool:
        """Whether a path leaves ``src`` through another kernel and arrives in ``dst``: merging the
        two would then make the merged kernel depend on itself."""
        inside = set(src.nodes) | set(dst.nodes)
        stack = [u for n in src.nodes for v in n.outputs for u in self.users[v] if u not in inside]
        seen: set[Node] = set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            if self.group_of.get(u) is dst:
                return True
            stack.extend(w for v in u.outputs for w in self.users[v])
        return False

    def _neighbours(self, grp: Group) -> list[Group]:
        """Kernels that produce, consume, or also read (horizontal fusion) this group's values."""
        out = []
        for n in grp.nodes:
            for v in n.inputs:
                p = self.producer.get(v)
                if p is not None and self.group_of.get(p) not in (None, grp) and self.group_of[p] not in out:
                    out.append(self.group_of[p])
                if v in self.immediates or v.type.rank == 0:  # reading the same scalar (lr) saves nothing,
                    continue  # and every optimizer update reads it: they would all become one kernel
                for u in self.users[v]:
                    if self.group_of.get(u) not in (None, grp) and self.group_of[u] not in out:
                        out.append(self.group_of[u])
            for v in n.outputs:
                for u in self.users[v]:
                    if self.group_of.get(u) not in (None, grp) and self.group_of[u] not in out:
                        out.append(self.group_of[u])
        return out

    def traffic(self, nodes: list[Node]) -> tuple[list[Value], list[Value], int, int]:
        """What a kernel made of ``nodes`` reads from and writes to memory, and the bytes."""
        inside = {v for n in nodes for v in n.outputs}
        reads = list(dict.fromkeys(v for n in nodes for v in n.inputs if v not in inside and v not in self.immediates))
        writes = [v for n in nodes for v in n.outputs
                  if v in self.graph_outputs or any(u not in nodes for u in self.users[v])]
        return reads, writes, sum(map(self.nbytes, reads)), sum(map(self.nbytes, writes))

    # -- schedule -------------------------------------------------------------------------------
    def schedule(self) -> list[Node | Group]:
        """Groups and kernel-less nodes in a topological order (original order where free)."""
        import networkx as nx  # here: its import costs ~0.1 s, which compiles served from cache skip

        units: dict[Node, Node | Group] = {n: self.group_of.get(n, n) for n in self.g.nodes}
        dag = nx.DiGraph()
        first = {}
        for i, n in enumerate(self.g.nodes):
            u = units[n]
            dag.add_node(id(u))
            first.setdefault(id(u), (i, u))
            for v in n.inputs:
                p = self.producer.get(v)
                if p is not None and units[p] is not u:
                    dag.add_edge(id(units[p]), id(u))
        order = nx.lexicographical_topological_sort(dag, key=lambda k: first[k][0])
        return [first[k][1] for k in order]


def _fmt(shape) -> str:
    return "[" + ",".join(map(str, shape)) + "]" if shape is not None else "-"


@dataclass
class KernelInfo:
    name: str
    kind: str
    nodes: list[Node]
    reads: list[Value]
    writes: list[Value]
    bytes_read: int
    bytes_written: int


@dataclass
class FusionReport:
    batch: int
    kernels: list[KernelInfo]
    rejected: list[tuple[Node, Node, str]]  # producer, consumer, why they are in different kernels
    fused_pairs: int
    bytes_before: int
    bytes_after: int
    kernels_before: int
    unfused_elementwise: list[tuple[Node, str]] = field(default_factory=list)

    def render(self) -> str:
        mb = 1 / 1e6
        lines = [f"fusion report (batch N={self.batch}): {self.kernels_before} kernels -> {len(self.kernels)}, "
                 f"memory traffic {self.bytes_before * mb:.2f} MB -> {self.bytes_after * mb:.2f} MB "
                 f"({self.fused_pairs} producer->consumer pairs fused)"]
        for k in self.kernels:
            lines.append(f"  {k.name} [{k.kind}] reads {k.bytes_read * mb:.3f} MB, "
                         f"writes {k.bytes_written * mb:.3f} MB")
            for n in k.nodes:
                origin = (n.note.split(":")[0] if n.note else "forward") + (f" @{n.scope}" if n.scope else "")
                lines.append(f"      {n.op:<28} %{n.outputs[0].name:<32} {origin}")
        if self.rejected:
            lines.append("  not fused:")
            for p, c, why in self.rejected:
                lines.append(f"    %{p.outputs[0].name} ({p.op}) -> %{c.outputs[0].name} ({c.op}): {why}")
        if self.unfused_elementwise:
            lines.append("  elementwise ops without a matmul or reduction in their kernel:")
            for n, why in self.unfused_elementwise:
                lines.append(f"    %{n.outputs[0].name} ({n.op}): {why}")
        return "\n".join(lines)


def fuse(g: Graph, batch: int = 256, target: str = "cpu") -> tuple[Graph, FusionReport]:
    fz = Fuser(g, batch, target)
    fz.run()
    units = fz.schedule()
    before = sum(sum(fz.traffic([n])[2:]) for n in g.nodes if materialized(n))  # one kernel per node
    b = GraphBuilder.extend(Graph(g.name, g.args, [], g.outputs, g.updates))
    kernels: list[KernelInfo] = []
    position = {n: i for i, n in enumerate(g.nodes)}
    for u in units:
        if isinstance(u, Node):
            b.add_node(u)
            continue
        u.name = f"k{len(kernels)}"
        members = sorted(u.nodes, key=position.__getitem__)
        for n in members:
            b.add_node(Node(n.op, n.inputs, n.outputs, n.attrs, n.loc, n.scope, n.note, u.name))
        reads, writes, br, bw = fz.traffic(members)
        kernels.append(KernelInfo(u.name, u.kind, members, reads, writes, br, bw))
    fused_graph = b.finish(g.outputs, g.updates)

    rejected, fused_pairs = [], 0
    for c in g.nodes:
        if not materialized(c):
            continue
        for v in dict.fromkeys(c.inputs):
            p = fz.producer.get(v)
            if p is None or not materialized(p):
                continue
            if fz.group_of[p] is fz.group_of[c]:
                fused_pairs += 1
            else:
                why = fz.decisions.get((id(fz.group_of[p]), c)) or fz.why_not(c, fz.group_of[p]) or \
                    "the two kernels could not be merged"
                rejected.append((p, c, why))
    unfused = []
    for k in kernels:
        if k.kind == "elementwise":
            for n in k.nodes:
                ins = [p for v in n.inputs if (p := fz.producer.get(v)) is not None and materialized(p)]
                why = next((fz.decisions.get((id(fz.group_of[p]), n)) for p in ins
                            if fz.group_of[p] is not fz.group_of[n]), None) or \
                    "its operands come only from graph arguments or other elementwise kernels"
                unfused.append((n, why))
    bytes_after = sum(k.bytes_read + k.bytes_written for k in kernels)
    kernels_before = sum(1 for n in g.nodes if materialized(n))
    report = FusionReport(batch, kernels, rejected, fused_pairs, before, bytes_after, kernels_before, unfused)
    return fused_graph, report


@register_pass
@dataclass(frozen=True)
class Fuse(Pass):
    """Group nodes into kernels (``node.kernel``); the report explains each decision."""

    name = "fuse"
    batch: int = 256  # the batch size N at which bytes are counted
    target: str = "cpu"  # whose GEMM capabilities decide (codegen/targets.py)

    def run(self, graph: Graph) -> PassResult:
        fused, report = fuse(graph, self.batch, self.target)
        return PassResult(fused, report.render(), report)


def kernels(g: Graph) -> list[list[Node]]:
    """The kernels of a fused graph, in schedule order (consecutive nodes with one ``kernel``)."""
    out: dict[str, list[Node]] = defaultdict(list)
    for n in g.nodes:
        if n.kernel is not None:
            out[n.kernel].append(n)
    return list(out.values())
