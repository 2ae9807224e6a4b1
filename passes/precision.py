"""Change a graph's floating-point precision (e.g. to float64 for gradient checking)."""

from __future__ import annotations

from gradfuse.ir.graph import Graph, GraphBuilder, Value
from gradfuse.ir.registry import get_op
from gradfuse.ir.types import DType, TensorType


def with_float(g: Graph, dtype: DType = DType.f64) -> Graph:
    """The same graph computing in ``dtype``: every float argument, constant and cast changes."""

    def convert(t: TensorType) -> TensorType:
        return t.with_dtype(dtype) if t.dtype.is_float else t

    b = GraphBuilder(g.name)
    env: dict[Value, Value] = {}
    for kind, v in g.args:
        env[v] = b.arg(v.name, convert(v.type), kind, exact=True)
    for n in g.nodes:
        attrs = dict(n.attrs)
        for name, spec in get_op(n.op).attrs.items():
            if spec.kind == "dtype" and attrs[name].is_float:
                attrs[name] = dtype
        outs = b.emit(n.op, [env[v] for v in n.inputs], attrs, names=[v.name for v in n.outputs],
                      loc=n.loc, scope=n.scope, note=n.note)
        env.update(zip(n.outputs, outs, strict=True))
    return b.finish([env[v] for v in g.outputs], [(env[a], env[c]) for a, c in g.updates])
