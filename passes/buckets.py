"""What the memory plan does for the all-reduce buckets of a data-parallel step (passes/distributed.py).

- **Order**: each bucket's ``allreduce`` nodes run together right after the step writing the
  bucket's last gradient (where the runtime starts its non-blocking all-reduce), and everything
  that reads a reduced gradient (the optimizer update) runs after the whole backward, earliest
  bucket first: the all-reduces overlap the rest of the backward instead of being waited for at once.
- **Layout**: the gradients of a bucket lie back to back in the arena (64-byte aligned, in the
  order of the bucket), one region live for as long as any of them, so one ``Iallreduce`` covers
  the bucket in place, with no copy into a fusion buffer and out again (Horovod copies).
"""

from __future__ import annotations

from collections.abc import Callable

from gradfuse.ir.graph import Graph, Node, Value

ALIGN = 64  # as passes/memory.py: every member starts at a multiple


def _bucket(n: Node) -> int | None:
    return n.attrs["bucket"] if n.op == "allreduce" else None


def bucket_order(steps: list[tuple[Node, ...]], order: list[int]) -> list[int]:
    """``order`` (step indices, topological) with the buckets' all-reduces and their readers moved
    as described above; the order itself where the graph has no all-reduce (and on a second call)."""
    buckets = {i: {b for n in u if (b := _bucket(n)) is not None} for i, u in enumerate(steps)}
    if not any(buckets.values()):
        return order
    writer = {v: i for i, u in enumerate(steps) for n in u for v in n.outputs}
    deps = {i: {writer[v] for n in u for v in n.inputs if v in writer} - {i} for i, u in enumerate(steps)}
    # after: steps reading a reduced gradient, directly or through others, and the last bucket each waits for
    waits_for: dict[int, int] = {}
    for i in order:  # topological: every dependency is seen first
        got = [waits_for[d] for d in deps[i] if d in waits_for] + [b for d in deps[i] for b in buckets[d]]
        if got and not buckets[i]:
            waits_for[i] = max(got)
    host = {i for i, bs in buckets.items() if bs}
    needs: dict[int, set[int]] = {}  # bucket -> the steps writing its gradients
    members: dict[int, list[int]] = {}
    for i in order:
        if i in host:
            (b,) = buckets[i]
            members.setdefault(b, []).append(i)
            needs.setdefault(b, set()).update(deps[i])
    out: list[int] = []
    done: set[int] = set()
    started: set[int] = set()

    def start_ready() -> None:
        for b in sorted(members):
            if b not in started and needs[b] <= done:
                started.add(b)
                out.extend(members[b])
                done.update(members[b])

    start_ready()
    for i in order:
        if i in host or i in waits_for:
            continue
        out.append(i)
        done.add(i)
        start_ready()
    for b in sorted(set(members) - started):  # (a bucket whose gradients wait on a reader: not made here)
        out.extend(members[b])
    rest = [i for i in order if i in waits_for]
    out += sorted(rest, key=lambda i: waits_for[i])  # stable: ties keep their order
    assert sorted(out) == sorted(order)
    return out


def bucket_members(g: Graph, storage_of: Callable[[Value], str | None]) -> dict[int, list[str]]:
    """Bucket -> the arena storages (by name) of its reduced gradients, in the bucket's order."""
    out: dict[int, list[str]] = {}
    for n in g.nodes:
        if n.op == "allreduce":
            s = storage_of(n.outputs[0])
            if s is not None and s not in out.setdefault(n.attrs["bucket"], []):
                out[n.attrs["bucket"]].append(s)
    return out


def assign_with_buckets(buffers: list, groups: dict[int, list[str]], assign: Callable[[list], int]) -> int:
    """``assign(buffers)`` (the arena's first fit) with each bucket's buffers as one: a region as
    large as its members (each 64-byte aligned) and live from the first member's birth to the last
    one's death; the members then get consecutive offsets inside it. Returns the arena's size."""
    from .memory import Buffer

    by_name = {b.name: b for b in buffers}
    composites: list[tuple[Buffer, list]] = []
    inside: set[str] = set()
    for k, names in sorted(groups.items()):
        members = [by_name[n] for n in names if n in by_name and n not in inside]
        if not members:
            continue
        inside.update(b.name for b in members)
        size = sum(-(-b.nbytes // ALIGN) * ALIGN for b in members)
        region = Buffer(f"bucket {k}", members[0].type, size, min(b.first for b in members),
                        max(b.last for b in members))
        composites.append((region, members))
    if not composites:
        return assign(buffers)
    peak = assign([b for b in buffers if b.name not in inside] + [c for c, _ in composites])
    for region, members in composites:
        offset = region.offset
        for b in members:
            b.offset = offset
            offset += -(-b.nbytes // ALIGN) * ALIGN
    return peak


def describe(groups: dict[int, list[str]], buffers: list) -> list[str]:
    """Report lines: each bucket's region in the arena."""
    by_name = {b.name: b for b in buffers}
    lines = []
    for k, names in sorted(groups.items()):
        members = [by_name[n] for n in names if n in by_name]
        if members:
            lo = min(b.offset for b in members)
            hi = max(b.offset + b.nbytes for b in members)
            lines.append(f"    bucket {k}: {sum(b.nbytes for b in members):>12,} B of {len(members)} gradients at "
                         f"[{lo:,}, {hi:,}) in the arena, contiguous: one Iallreduce in place")
    return lines
