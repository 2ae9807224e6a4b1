"""The all-reduce calls of a generated ``step`` (a data-parallel training step): where it starts each
bucket's non-blocking all-reduce and where it waits for it, from the schedule alone. Shared by the
backends; the calls go to ``gradfuse.runtime.distributed`` (imported as ``_dist``)."""

from __future__ import annotations

from collections.abc import Callable

from gradfuse.ir.graph import Node, Value
from gradfuse.ir.registry import get_op

from .kernel_ir import Kernel, KernelProgram


def is_host(item) -> bool:
    """Whether a schedule item is a host op (an all-reduce): the step calls the runtime for it."""
    return isinstance(item, Kernel) and item.kind == "opaque" and "host" in get_op(item.nodes[0].op).lowering


def collective_calls(prog: KernelProgram, arr: Callable[[Value], str]
                     ) -> tuple[dict[int, list[str]], dict[int, list[int]]]:
    """Where the step starts each bucket's all-reduce (after its last allreduce node, which the memory
    plan puts right after the bucket's last gradient) and where it waits (before the first item reading
    a reduced gradient): schedule position -> lines."""
    nodes: dict[int, list[Node]] = {}
    last: dict[int, int] = {}
    for i, item in enumerate(prog.schedule):
        if is_host(item):
            n = item.nodes[0]
            nodes.setdefault(n.attrs["bucket"], []).append(n)
            last[n.attrs["bucket"]] = i
    starts: dict[int, list[str]] = {}
    for b, ns in nodes.items():
        outs = "".join(f"{arr(n.outputs[0])}, " for n in ns)
        ins = "".join(f"{arr(n.inputs[0])}, " for n in ns)
        starts.setdefault(last[b], []).append(f"_dist.start({b}, ({outs}), ({ins}), {ns[0].attrs['ranks']})")
    waits: dict[int, list[int]] = {}
    reduced = {n.outputs[0]: b for b, ns in nodes.items() for n in ns}
    pending = set(nodes)
    for i, item in enumerate(prog.schedule):
        reads = item.inputs if isinstance(item, Node) else item.reads
        for b in sorted({reduced[v] for v in reads if v in reduced} & pending):
            pending.discard(b)
            waits.setdefault(i, []).append(b)
    return starts, waits
