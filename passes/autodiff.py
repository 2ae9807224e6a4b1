"""Reverse-mode differentiation as a graph pass: forward graph in, joint graph out.

The backward half is ordinary IR: each op's VJP rule (``OpDef.vjp`` in ``ir/ops/``) emits
registered ops through a :class:`VJPContext`, which stamps every backward node with the forward
node it differentiates, the rule it applies and the user's source line, so the printed graph
reads like the chain rule:

    %grad.fc1: f32[N,128] = where %relu.mask, %grad.relu, %c0_0   # vjp(relu) of %relu: g * (x > 0) · ...

Cotangents of values used several times are summed; broadcasts are undone by sums; paths that
do not lead from a differentiated argument to the loss are pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import Graph, GraphBuilder, Node, Value
from gradfuse.ir.registry import get_op
from gradfuse.ir.types import DType, TensorType

from .manager import Pass, PassResult, register_pass
from .simplify import eliminate_dead_code

GRAD_PREFIX = "grad."


class VJPContext:
    """What a VJP rule sees: the forward node, and ``emit`` to write backward IR for it."""

    def __init__(self, builder: GraphBuilder, node: Node, wants: Sequence[bool]):
        self.builder, self.node, self._wants = builder, node, wants
        self.inputs, self.outputs, self.attrs = node.inputs, node.outputs, node.attrs
        self.wrt: str | None = None

    def wants(self, i: int) -> bool:
        """Whether the gradient of input ``i`` is needed (skip work for the others)."""
        return self._wants[i]

    def emit(self, op: str, *inputs: Value, rule: str, wrt: str | None = None, hint: str | None = None,
             **attrs) -> Value:
        """Emit one backward node; ``rule`` is the formula shown in the printed IR."""
        return self.emit_multi(op, *inputs, rule=rule, wrt=wrt, hint=hint, **attrs)[0]

    def emit_multi(self, op: str, *inputs: Value, rule: str, wrt: str | None = None, hint: str | None = None,
                   **attrs) -> tuple[Value, ...]:
        n = self.node
        of = f"vjp({n.op}) of %{n.outputs[0].name}" + (f" wrt {wrt}" if wrt else "")
        hint = hint or f"{GRAD_PREFIX}{n.outputs[0].name}.{op}"
        return self.builder.emit(op, inputs, attrs, hint=hint, loc=n.loc, scope=n.scope, note=f"{of}: {rule}")

    def const(self, value: float, like: Value | DType) -> Value:
        """A scalar constant of ``like``'s dtype, shared across the graph."""
        return self.builder.scalar(value, like if isinstance(like, DType) else like.type.dtype)

    def unbroadcast(self, g: Value, to: TensorType, wrt: str | None = None) -> Value:
        """Sum ``g`` over the axes that broadcasting added or stretched, back to shape ``to``."""
        if g.type.shape == to.shape:
            return g
        lead = g.type.rank - to.rank
        stretched = [i for i in range(lead, g.type.rank) if to.shape[i - lead] == 1 and g.type.shape[i] != 1]
        if not stretched:  # only leading axes were added: one sum drops them
            return self.emit("sum", g, rule="sum g over the broadcast axes", wrt=wrt, axes=list(range(lead)))
        summed = self.emit("sum", g, rule="sum g over the broadcast axes", wrt=wrt,
                           axes=list(range(lead)) + stretched, keepdims=True)
        return self.emit("reshape", summed, rule="drop the broadcast axes", wrt=wrt, shape=list(to.shape))

    def broadcast_back(self, g: Value, x: Value, axes, keepdims: bool) -> Value:
        """Undo a reduction's shape: ``g`` (reduced over ``axes``) broadcast back to ``x``'s shape."""
        if not keepdims:
            kept = [1 if i in axes else d for i, d in enumerate(x.type.shape)]
            g = self.emit("reshape", g, rule="restore the reduced axes", shape=kept)
        return self.emit("broadcast_to", g, rule="copy g along the reduced axes", shape=list(x.type.shape))


@dataclass(frozen=True)
class Gradients:
    """The joint graph and where to find things in it."""

    graph: Graph
    loss: Value
    grads: dict[str, Value]  # differentiated argument name -> its gradient
    saved: list[Value]  # forward values the backward reads (what training must keep in memory)
    independent: tuple[str, ...] = ()  # arguments the loss does not depend on: their gradient is a zero const


def differentiate(g: Graph, wrt: Sequence[str] | None = None, loss_index: int = 0) -> Gradients:
    """Append the backward of ``g.outputs[loss_index]`` (a scalar) to ``g``.

    ``wrt`` names the arguments to differentiate (default: every param). The joint graph
    returns the forward outputs followed by the gradients, in ``wrt`` order.
    """
    loss = g.outputs[loss_index]
    if loss.type.rank != 0 or not loss.type.dtype.is_float:
        raise GradfuseError(f"can only differentiate a scalar float loss, but output {loss_index} is {loss!r}")
    args = {v.name: v for _, v in g.args}
    wrt = [v.name for v in g.params] if wrt is None else list(wrt)
    for name in wrt:
        if name not in args:
            raise GradfuseError(f"cannot differentiate with respect to %{name}: not an argument of @{g.name}")
        if not args[name].type.dtype.is_float:
            raise GradfuseError(f"cannot differentiate with respect to %{name}: {args[name].type} is not a float")

    # forward sweep: which values depend on a differentiated argument
    active: set[Value] = {args[n] for n in wrt}
    for n in g.nodes:
        if get_op(n.op).nondiff is None and any(v in active for v in n.inputs):
            active.update(v for v in n.outputs if v.type.dtype.is_float)

    b = GraphBuilder.extend(g)
    cotangents: dict[Value, list[Value]] = {}

    (seed,) = b.emit("const", [], {"value": 1.0, "dtype": loss.type.dtype, "shape": ()},
                     hint=f"{GRAD_PREFIX}{loss.name}", note="dL/dL = 1")
    cotangents[loss] = [seed]

    def total(v: Value) -> Value | None:
        parts = cotangents.pop(v, [])
        if len(parts) <= 1:
            return parts[0] if parts else None
        acc = parts[0]
        for i, p in enumerate(parts[1:]):
            acc = b.emit1("add", acc, p, hint=f"{GRAD_PREFIX}{v.name}.sum",
                          note=f"accumulate: %{v.name} is used {len(parts)} times (part {i + 2})")
        return acc

    for n in reversed(g.nodes):
        gs = [total(v) for v in n.outputs]
        if all(x is None for x in gs):
            continue
        wants = [v in active for v in n.inputs]
        if not any(wants):
            continue
        opdef = get_op(n.op)
        assert opdef.vjp is not None, f"{n.op} is active but has no VJP rule"
        ctx = VJPContext(b, n, wants)
        grads = opdef.vjp(ctx, *gs)
        assert len(grads) == len(n.inputs), f"vjp({n.op}) returned {len(grads)} gradients for {len(n.inputs)} inputs"
        for v, want, gv in zip(n.inputs, wants, grads, strict=True):
            if want and gv is not None:
                assert gv.type == v.type, f"vjp({n.op}): gradient {gv!r} does not match %{v.name}: {v.type}"
                if gv.name.startswith(f"{GRAD_PREFIX}{n.outputs[0].name}."):  # a rule's own helper name
                    b.rename(gv, f"{GRAD_PREFIX}{v.name}", fresh=True)
                cotangents.setdefault(v, []).append(gv)

    grads: dict[str, Value] = {}
    independent = []
    for name in wrt:
        v = args[name]
        gv = total(v)
        if gv is None:  # the loss does not depend on it: its gradient is zero
            independent.append(name)
            gv = b.emit1("const", attrs={"value": 0.0, "dtype": v.type.dtype, "shape": list(v.type.shape)},
                         hint=f"{GRAD_PREFIX}{name}", note=f"the loss does not depend on %{name}")
        elif gv.name != f"{GRAD_PREFIX}{name}":
            b.rename(gv, f"{GRAD_PREFIX}{name}")
        grads[name] = gv

    outputs = list(g.outputs) + list(grads.values())
    joint, _ = eliminate_dead_code(b.finish(outputs, g.updates))  # rules may emit helpers nothing uses
    by_name = {v.name: v for v in joint.values()}  # the pass may have copied the values
    grads = {name: by_name[v.name] for name, v in grads.items()}
    forward_values = {by_name[v.name] for n in g.nodes for v in n.outputs if v.name in by_name} | \
        {by_name[v.name] for v in g.inputs}
    saved = list(dict.fromkeys(v for n in joint.nodes if n.outputs[0] not in forward_values
                               for v in n.inputs if v in forward_values))
    return Gradients(joint, by_name[loss.name], grads, saved, tuple(independent))



def gradients_of(joint: Graph) -> Gradients:
    """The Gradients of a graph that :func:`differentiate` made, read off the graph itself (the
    loss first among the outputs, each param's gradient an output named ``%grad.<param>``), so
    a later pass needs nothing but the graph."""
    outputs = {v.name: v for v in joint.outputs}
    grads = {p.name: outputs[GRAD_PREFIX + p.name] for p in joint.params if GRAD_PREFIX + p.name in outputs}
    producers = joint.producers()
    independent = tuple(name for name, v in grads.items() if producers[v].op == "const"
                        and (producers[v].note or "").startswith("the loss does not depend"))
    forward = {v for n in joint.nodes if n.stage == "forward" for v in n.outputs} | set(joint.inputs)
    saved = list(dict.fromkeys(v for n in joint.nodes if n.stage != "forward" for v in n.inputs if v in forward))
    return Gradients(joint, joint.outputs[0], grads, saved, independent)


@register_pass
@dataclass(frozen=True)
class Autodiff(Pass):
    """Append the backward of the loss (output 0) with respect to every param; the gradients
    join the outputs as ``%grad.<param>``."""

    name: ClassVar[str] = "autodiff"

    def run(self, graph: Graph) -> PassResult:
        grads = differentiate(graph)
        added = len(grads.graph.nodes) - len(graph.nodes)
        report = (f"backward of %{grads.loss.name}: {added} nodes for the gradients of {len(grads.grads)} params; "
                  f"it reads {len(grads.saved)} forward values ({', '.join('%' + v.name for v in grads.saved)})")
        if grads.independent:
            report += f"\nthe loss does not depend on {', '.join('%' + n for n in grads.independent)}"
        return PassResult(grads.graph, report, grads)
