"""Collectives between the ranks of a data-parallel run (MPI), kept in the IR so that what is
communicated, and when, is printed with the rest of the training step.

``allreduce`` is a *host* op: no kernel computes it. The generated ``step`` starts a
non-blocking all-reduce of its bucket (every gradient of the bucket lies contiguously in the
arena, in place) after the kernel that writes the bucket's last gradient and waits for it before
the first kernel that reads a reduced gradient (runtime/distributed.py). In one process its
meaning is that of ``ranks`` replicas holding the same value: the sum is ``ranks * x``.
"""

from __future__ import annotations

from gradfuse.errors import ShapeError

from ..registry import Attr, OpDef, register
from ..types import TensorType
from .common import FLOATS, same_dtype


def _allreduce_infer(x: TensorType, *, bucket: int, ranks: int) -> TensorType:
    same_dtype("allreduce", x, allowed=FLOATS)
    if bucket < 0 or ranks < 1:
        raise ShapeError(f"allreduce: bucket {bucket} and ranks {ranks} must be >= 0 and >= 1")
    return x


def allreduce_ref(x, *, bucket: int, ranks: int):
    """The sum over ``ranks`` replicas that all hold ``x``."""
    return (x * x.dtype.type(ranks)).astype(x.dtype, copy=False)


register(OpDef("allreduce", "structured", _allreduce_infer, allreduce_ref, arity=1,
               attrs={"bucket": Attr("int", doc="the bucket of gradients reduced together (one Iallreduce)"),
                      "ranks": Attr("int", doc="the number of ranks summed over")},
               doc="the sum of x over every rank (MPI_SUM), in place; one Iallreduce covers a bucket",
               nondiff="a collective over ranks that runs on gradients after the backward",
               role="opaque", lowering={"host": "allreduce"}, aligned={0: 0}))


def is_host(op: OpDef) -> bool:
    """Whether the step calls the runtime for ``op`` instead of a kernel."""
    return "host" in op.lowering
