"""The reference interpreter: runs any graph on numpy arrays, node by node, with each op's
``ref``. It is the oracle every later stage is tested against, so it favours clarity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradfuse.errors import InputError

from .graph import Graph, Value
from .registry import get_op
from .types import dim_value


@dataclass
class Result:
    outputs: list[np.ndarray]
    state: dict[str, np.ndarray]  # the updated state, by state argument name
    env: dict[str, np.ndarray]  # every value computed, by name (for inspection and debugging)


def bind_arguments(g: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Check every argument is fed with the right dtype and shape; returns the symbol sizes."""
    missing = [v.name for _, v in g.args if v.name not in feeds]
    if missing:
        raise InputError(f"@{g.name}: no value given for {', '.join('%' + m for m in missing)}")
    extra = set(feeds) - {v.name for _, v in g.args}
    if extra:
        raise InputError(f"@{g.name}: unexpected value(s) for {', '.join(sorted(extra))} "
                         f"(arguments: {', '.join(v.name for _, v in g.args)})")
    bindings: dict[str, int] = {}
    for kind, v in g.args:
        a = np.asarray(feeds[v.name])
        if a.dtype != v.type.dtype.np:
            raise InputError(f"%{v.name} ({kind.value}) expects {v.type}, got dtype {a.dtype}")
        if a.ndim != v.type.rank:
            raise InputError(f"%{v.name} ({kind.value}) expects {v.type}, got shape {list(a.shape)}")
        for want, got in zip(v.type.shape, a.shape, strict=True):
            if isinstance(want, str) and "*" in want:  # a product: checked once its symbols are bound
                continue
            if isinstance(want, str):
                if bindings.setdefault(want, got) != got:
                    raise InputError(f"%{v.name} has {want}={got} but an earlier argument set {want}="
                                     f"{bindings[want]}")
            elif want != got:
                raise InputError(f"%{v.name} ({kind.value}) expects {v.type}, got shape {list(a.shape)}")
    for kind, v in g.args:
        if v.type.concrete(bindings) != np.shape(feeds[v.name]):
            raise InputError(f"%{v.name} ({kind.value}) expects {v.type}, got shape {list(np.shape(feeds[v.name]))} "
                             f"({', '.join(f'{k}={n}' for k, n in sorted(bindings.items()))})")
    return bindings


def concrete_attrs(attrs: dict, spec, bindings: dict[str, int]) -> dict:
    """Replace symbols in ``dims`` attributes (shapes of reshape, const, ...) by their sizes."""
    out = dict(attrs)
    for name, a in spec.items():
        if a.kind == "dims":
            out[name] = tuple(dim_value(d, bindings) for d in attrs[name])
    return out


def interpret(g: Graph, feeds: Mapping[str, np.ndarray]) -> Result:
    bindings = bind_arguments(g, feeds)
    env: dict[Value, np.ndarray] = {v: np.asarray(feeds[v.name]) for _, v in g.args}
    for n in g.nodes:
        opdef = get_op(n.op)
        outs = opdef.run_ref([env[v] for v in n.inputs], concrete_attrs(n.attrs, opdef.attrs, bindings))
        for v, a in zip(n.outputs, outs, strict=True):
            a = np.asarray(a)
            assert a.dtype == v.type.dtype.np, f"{n.op}: ref gave {a.dtype}, IR says {v.type}"
            assert a.shape == v.type.concrete(bindings), f"{n.op}: ref gave {a.shape}, IR says {v.type}"
            env[v] = a
    return Result(
        outputs=[env[v] for v in g.outputs],
        state={old.name: env[new] for old, new in g.updates},
        env={v.name: a for v, a in env.items()},
    )
