"""The planned interpreter: runs a graph the way a runtime following a memory plan would, so that
a wrong plan gives wrong numbers.

One uint8 arena of ``plan.peak`` bytes (filled with 0xFF: unwritten f32 reads as NaN); every
value the plan stores in it is a numpy view at its offset, written with ``np.copyto`` by the node
computing it and read back from there by every later node. Values updated in place write into
(copies of) the argument arrays. Only immediates and register values are temporaries, and
register values are dropped when their kernel ends.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from gradfuse.errors import InputError
from gradfuse.ir.graph import Graph, Value
from gradfuse.ir.interpreter import Result, bind_arguments, concrete_attrs
from gradfuse.ir.registry import get_op, role

from .memory import MemoryPlan


def run_planned(g: Graph, plan: MemoryPlan, feeds: Mapping[str, np.ndarray]) -> Result:
    """Run ``g`` in ``plan``'s step order with its storage; ``feeds`` are copied, not modified."""
    bindings = bind_arguments(g, feeds)
    wrong = {s: n for s, n in bindings.items() if n != plan.sizes.get(s, plan.batch)}
    if wrong:
        planned_for = f"batch {plan.batch}" if plan.batch is not None else \
            ", ".join(f"{s}={plan.sizes[s]}" for s in sorted(plan.sizes))
        raise InputError(f"@{g.name}: the memory plan is for {planned_for}, fed "
                         + ", ".join(f"{s}={n}" for s, n in wrong.items()))
    planned = [n for s in plan.steps for n in s.nodes]
    assert len(planned) == len(g.nodes) and set(planned) == set(g.nodes), "the plan is for another graph"
    arena = np.full(plan.peak, 0xFF, dtype=np.uint8)
    args = {v.name: np.array(feeds[v.name], copy=True) for _, v in g.args}
    temps: dict[Value, np.ndarray] = {}

    def storage(v: Value) -> np.ndarray | None:
        p = plan.values[v.name]
        shape = v.type.concrete(bindings)
        if p.offset is not None:
            return arena[p.offset:p.offset + p.nbytes].view(v.type.dtype.np).reshape(shape)
        if p.storage is not None:
            return args[p.storage].reshape(shape)
        return None

    def read(v: Value) -> np.ndarray:
        a = storage(v)
        return temps[v] if a is None else a

    for step in plan.steps:
        for n in step.nodes:
            if role(n) == "view" and storage(n.outputs[0]) is not None:
                continue  # the view reads its operand's bytes: nothing to compute
            opdef = get_op(n.op)
            if role(n) == "immediate":  # reads only shapes: give it no data
                inputs = [np.empty(v.type.concrete(bindings), v.type.dtype.np) for v in n.inputs]
            else:
                inputs = [read(v) for v in n.inputs]
            outs = opdef.run_ref(inputs, concrete_attrs(n.attrs, opdef.attrs, bindings))
            for v, a in zip(n.outputs, outs, strict=True):
                a = np.array(a, copy=True)  # never a view of an operand's storage
                assert a.dtype == v.type.dtype.np and a.shape == v.type.concrete(bindings), f"{n.op}: {a.dtype}"
                dst = storage(v)
                if dst is None:
                    temps[v] = a
                else:
                    np.copyto(dst, a)
        for v in [v for v in temps if plan.values[v.name].kind == "register"]:
            del temps[v]  # registers end with their kernel
    outputs = [np.array(read(v)) for v in g.outputs]
    state = {old.name: np.array(read(new)) for old, new in g.updates}
    env = {v.name: a for v, a in zip(g.outputs, outputs, strict=True)}
    env.update({new.name: state[old.name] for old, new in g.updates})
    return Result(outputs, state, env)
