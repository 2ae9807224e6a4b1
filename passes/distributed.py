"""Data parallelism as IR: every gradient is all-reduced across the ranks between the backward
and the optimizer update, in buckets planned here, at compile time.

For ``%grad.W`` (what autodiff returns) the pass writes::

    %grad.W.local = ...                                  # the backward, as before
    %grad.W.sum = allreduce %grad.W.local {bucket=0}     # allreduce of %grad.W, bucket 0
    %grad.W = mul %grad.W.sum, %c0.5                     # mean over 2 ranks

so the optimizer pass reads the mean as it read the gradient (and its elementwise update fuses
the 1/K). Buckets follow the order the backward produces the gradients, up to ``bucket_mb``
each (PyTorch DDP's 25 MB); the memory plan lays each bucket out contiguously, so one
non-blocking all-reduce covers it in place (passes/buckets.py, runtime/distributed.py).

Plain SGD's fold of the update into the gradient's GEMM (codegen/cpu.py) cannot apply to a
reduced gradient: the GEMM writes the local gradient, and the update reads the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import Graph, GraphBuilder, Node, Value

from .autodiff import GRAD_PREFIX, gradients_of
from .manager import Pass, PassResult, register_pass

DEFAULT_BUCKET_MB = 25.0


@dataclass(frozen=True)
class Bucket:
    index: int
    grads: tuple[str, ...]  # the gradients' names (%grad.W), in the order the backward produces them
    nbytes: int


def plan_buckets(sizes: list[tuple[str, int, str]], cap_bytes: int) -> list[Bucket]:
    """Buckets of consecutive gradients ``(name, bytes, dtype)`` of one dtype, each up to
    ``cap_bytes`` (a gradient larger than the cap has a bucket of its own)."""
    buckets: list[Bucket] = []
    names: list[str] = []
    total, dtype = 0, None
    for name, nbytes, dt in sizes:
        if names and (total + nbytes > cap_bytes or dt != dtype):
            buckets.append(Bucket(len(buckets), tuple(names), total))
            names, total = [], 0
        names.append(name)
        total += nbytes
        dtype = dt
    if names:
        buckets.append(Bucket(len(buckets), tuple(names), total))
    return buckets


def add_allreduce(graph: Graph, workers: int, bucket_mb: float = DEFAULT_BUCKET_MB) -> tuple[Graph, list[Bucket]]:
    """``graph`` (what autodiff made) with every parameter gradient replaced by its mean over
    ``workers`` ranks; returns the graph and its buckets."""
    if workers < 2:
        return graph, []
    if not bucket_mb > 0:
        raise GradfuseError(f"allreduce: bucket_mb must be > 0, got {bucket_mb}")
    grads = gradients_of(graph)
    producers = graph.producers()
    reduced = {v: name for name, v in grads.grads.items() if name not in grads.independent and v in producers}
    order = [v for n in graph.nodes for v in n.outputs if v in reduced]  # as the backward produces them
    buckets = plan_buckets([(v.name, v.type.nbytes({}), v.type.dtype.name) for v in order],
                           int(bucket_mb * 1e6))
    bucket_of = {name: b.index for b in buckets for name in b.grads}
    names = {v.name for v in graph.values()}

    def fresh(hint: str) -> str:
        name, i = hint, 1
        while name in names:
            name, i = f"{hint}.{i}", i + 1
        names.add(name)
        return name

    local = {v: Value(fresh(v.name + ".local"), v.type) for v in order}
    b = GraphBuilder.extend(Graph(graph.name, graph.args, [], graph.outputs, graph.updates))
    mean: dict[Value, Value] = {}
    for n in graph.nodes:
        b.add_node(Node(n.op, n.inputs, tuple(local.get(v, v) for v in n.outputs), n.attrs, n.loc, n.scope,
                        n.note, n.kernel))
        for v in n.outputs:
            if v in local:
                k = bucket_of[v.name]
                total = b.emit1("allreduce", local[v], attrs={"bucket": k, "ranks": workers},
                                hint=fresh(v.name + ".sum"), note=f"allreduce of %{v.name}, bucket {k}")
                scale = b.scalar(1.0 / workers, v.type.dtype)
                (out,) = b.emit("mul", [total, scale], names=[v.name], note=f"allreduce: mean over {workers} ranks")
                mean[v] = out
    outputs = [mean.get(v, v) for v in graph.outputs]
    updates = [(old, mean.get(new, new)) for old, new in graph.updates]
    return b.finish(outputs, updates), buckets


def describe_buckets(buckets: list[Bucket], workers: int) -> str:
    lines = [f"all-reduce over {workers} ranks: {len(buckets)} bucket(s), "
             f"{sum(b.nbytes for b in buckets):,} B of gradients per step"]
    for bk in buckets:
        lines.append(f"  bucket {bk.index}: {bk.nbytes:>12,} B  {', '.join('%' + g for g in bk.grads)}")
    return "\n".join(lines)


@register_pass
@dataclass(frozen=True)
class AllReduce(Pass):
    """Average every parameter gradient over ``workers`` ranks (data parallelism), in buckets of
    up to ``bucket_mb`` MB in backward order; runs between autodiff and the optimizer."""

    name: ClassVar[str] = "allreduce"
    workers: int = 2
    bucket_mb: float = DEFAULT_BUCKET_MB

    def run(self, graph: Graph) -> PassResult:
        if not any(o.name.startswith(GRAD_PREFIX) for o in graph.outputs):
            raise GradfuseError("allreduce: the graph has no gradients (run it after autodiff)")
        g, buckets = add_allreduce(graph, self.workers, self.bucket_mb)
        return PassResult(g, describe_buckets(buckets, self.workers), buckets)
