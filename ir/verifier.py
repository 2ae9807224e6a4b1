"""The IR verifier: run after building a graph and after every pass."""

from __future__ import annotations

from gradfuse.errors import GradfuseError, VerifyError

from .graph import NAME_RE, ArgKind, Graph
from .registry import get_op


def verify(g: Graph) -> Graph:
    """Check SSA form, names, types (re-running every op's shape rule; every symbol bound by an
    argument's shape), outputs and updates.

    Returns ``g`` so it can be chained; raises VerifyError naming the node at fault.
    """
    defined: set = set()
    names: set[str] = set()

    def define(v, where: str):
        if v in defined:
            raise VerifyError(f"{where}: %{v.name} is defined twice")
        if v.name in names:
            raise VerifyError(f"{where}: two values are named %{v.name}")
        if not NAME_RE.match(v.name):
            raise VerifyError(f"{where}: %{v.name} is not a valid value name")
        defined.add(v)
        names.add(v.name)

    for kind, v in g.args:
        assert isinstance(kind, ArgKind)
        define(v, f"@{g.name} argument")
    # the sizes a run can bind: plain symbols of the arguments' shapes (a product, N*32, binds nothing)
    bound = {d for _, v in g.args for d in v.type.shape if isinstance(d, str) and "*" not in d}
    for _, v in g.args:
        if not v.type.symbols <= bound:
            raise VerifyError(f"@{g.name} argument %{v.name}: {v.type} has a product dimension whose symbols "
                              f"({', '.join(sorted(v.type.symbols - bound))}) no argument binds alone")
    for i, n in enumerate(g.nodes):
        where = f"@{g.name} node {i} ({n.op} -> %{n.outputs[0].name if n.outputs else '?'})"
        for v in n.inputs:
            if v not in defined:
                raise VerifyError(f"{where}: operand %{v.name} is used before it is defined")
        try:
            opdef = get_op(n.op)
            attrs = opdef.normalize_attrs(n.attrs)
            inferred = opdef.infer_types([v.type for v in n.inputs], attrs)
        except GradfuseError as e:
            raise VerifyError(f"{where}: {e}") from None
        if attrs != n.attrs:
            raise VerifyError(f"{where}: attributes {n.attrs} are not in normal form {attrs}")
        got = tuple(v.type for v in n.outputs)
        if got != inferred:
            raise VerifyError(f"{where}: result types {', '.join(map(str, got))} differ from the "
                              f"shape rule's {', '.join(map(str, inferred))}")
        for v in n.outputs:
            define(v, where)
            if not v.type.symbols <= bound:
                unbound = ", ".join(sorted(v.type.symbols - bound))
                raise VerifyError(f"{where}: %{v.name}: {v.type} uses {unbound}, which no argument's shape binds "
                                  "(a run could not size it)")
    for v in g.outputs:
        if v not in defined:
            raise VerifyError(f"@{g.name}: output %{v.name} is not defined")
    updatable = set(g.state) | set(g.params)
    seen = set()
    for old, new in g.updates:
        if old not in updatable:
            raise VerifyError(f"@{g.name}: update of %{old.name}, which is not a param or state argument")
        if old in seen:
            raise VerifyError(f"@{g.name}: state %{old.name} is updated twice")
        seen.add(old)
        if new not in defined:
            raise VerifyError(f"@{g.name}: update of %{old.name} uses undefined %{new.name}")
        if new.type != old.type:
            raise VerifyError(f"@{g.name}: update of %{old.name}: {old.type} gets a value of type {new.type}")
    return g
