"""VJP op-table tests: every op's backward rule against float64 finite differences.

1. completeness: every registered op has a ``vjp`` rule or a non-empty ``nondiff`` reason, never
   both (and the check itself fails on a fake record that has neither);
2. for every differentiable op and every case of ``op_cases.CASES`` with a float operand: the
   loss L = Σ_k ⟨out_k, u_k⟩ (u_k fixed random arrays, every float output included) is
   differentiated w.r.t. every float operand, and ⟨∇L, v⟩ = ⟨v, Jᵀu⟩ is compared in float64
   with a 4-point central difference of L along a random unit direction v (= ⟨J v, u⟩);
3. readable backward IR: closed-form rules survive as one node with their formula, every
   backward node says which rule made it and carries the forward node's location and scope;
4. the chain rule's bookkeeping: accumulation of cotangents, undoing broadcasts, pruning,
   integer inputs, parameters the loss does not depend on;
5. errors a user can cause: a non-scalar loss, an unknown name, an integer argument.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from op_cases import CASES, OpCase, bindings_for, build_graph, case, feeds_for

from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import ArgKind, Graph, GraphBuilder, Node, SourceLoc
from gradfuse.ir.interpreter import interpret
from gradfuse.ir.registry import OpDef, all_ops, get_op
from gradfuse.ir.types import DType, TensorType, as_type
from gradfuse.passes.autodiff import Gradients, differentiate
from gradfuse.passes.precision import with_float

H = 1e-4  # finite-difference step along a unit direction
RTOL = 1e-6
ATOL = 1e-9  # floor for directional derivatives that are (nearly) zero
KINK_MARGIN = 1e-2  # inputs stay this far from a nondifferentiable point (the stencil moves them <= 2H)


# ---- 1. completeness -------------------------------------------------------------------------
def vjp_record_problems(opdef: OpDef) -> list[str]:
    """What is wrong with an op record's differentiation entry (empty when it is fine)."""
    has_rule = opdef.vjp is not None
    reason = opdef.nondiff
    if has_rule and reason is not None:
        return [f"{opdef.name}: has both a vjp rule and a nondiff reason ({reason!r}); pick one"]
    if not has_rule and reason is None:
        return [f"{opdef.name}: has neither a vjp rule nor a nondiff reason saying why it has no gradient"]
    if not has_rule and not reason.strip():
        return [f"{opdef.name}: its nondiff reason is empty; say why it has no gradient"]
    if has_rule and not callable(opdef.vjp):
        return [f"{opdef.name}: vjp is {opdef.vjp!r}, not a callable rule"]
    return []


def test_every_op_has_a_vjp_rule_or_a_reason():
    problems = [p for opdef in all_ops().values() for p in vjp_record_problems(opdef)]
    assert not problems, "\n".join(problems)


def _fake(**kw) -> OpDef:
    """An op record that is never registered."""
    return OpDef("fake_op", "elementwise", infer=lambda x: x, ref=lambda x: x, arity=1, doc="a fake", **kw)


@pytest.mark.parametrize(("kw", "message"), [
    ({}, "neither a vjp rule nor a nondiff reason"),
    ({"nondiff": "  "}, "nondiff reason is empty"),
    ({"vjp": lambda ctx, g: [g], "nondiff": "why not"}, "both a vjp rule and a nondiff reason"),
    ({"vjp": "not a function"}, "not a callable rule"),
], ids=["neither", "empty-reason", "both", "not-callable"])
def test_the_completeness_check_can_fail(kw, message):
    fake = _fake(**kw)
    assert "fake_op" not in all_ops()
    (problem,) = vjp_record_problems(fake)
    assert problem.startswith("fake_op: ") and message in problem
    assert not vjp_record_problems(_fake(vjp=lambda ctx, g: [g]))
    assert not vjp_record_problems(_fake(nondiff="piecewise constant"))


# ---- 2. VJP vs finite differences, over the case table ---------------------------------------
# Cases op_cases.CASES lacks for a numerical check: cast's cases all have an integer/bool operand or
# result. with_float makes this one an f64 -> f64 cast, which still runs cast's vjp rule.
EXTRA_CASES: dict[str, list[OpCase]] = {
    "cast": [case("f32[N,3]", dtype="f64")],
}

# Known-wrong rules, marked xfail(strict=True) so that a fix shows up as XPASS:
# (op, case index or None for every case, which outputs enter the loss) -> (reason, exception seen).
KNOWN_BAD: dict[tuple[str, int | None, str], tuple[str, type[BaseException]]] = {}
# Extra runs that leave out the known-wrong part, so the rest of such a rule is still checked:
# "first" puts only the first output in the loss; "wrt=..." differentiates only those operands.
PARTIAL: dict[str, list[str]] = {
    "batch_norm_train": ["first"],
    "batch_norm_infer": ["wrt=x0,x1,x2"],
}


def _vjp_cases() -> dict[str, list[OpCase]]:
    out = {}
    for op, opdef in sorted(all_ops().items()):
        if opdef.vjp is not None:
            out[op] = list(CASES.get(op, [])) + EXTRA_CASES.get(op, [])
    return out


def _float_outputs(op: str, c: OpCase) -> list[int]:
    opdef = get_op(op)
    types = opdef.infer_types(list(c.types), opdef.normalize_attrs(c.attrs))
    return [i for i, t in enumerate(types) if t.dtype.is_float]


def _checkable(op: str, c: OpCase) -> bool:
    if getattr(c.gen, "ties", False):  # a tie is a kink: no derivative to compare with
        return False
    return any(t.dtype.is_float for t in c.types) and bool(_float_outputs(op, c))


def _vjp_params():
    for op, cases in _vjp_cases().items():
        for i, c in enumerate(cases):
            if not _checkable(op, c):
                continue
            for mode in ["all", *PARTIAL.get(op, [])]:
                bad = KNOWN_BAD.get((op, i, mode)) or KNOWN_BAD.get((op, None, mode))
                marks = [pytest.mark.xfail(strict=True, reason=bad[0], raises=bad[1])] if bad else []
                for b in bindings_for(c):
                    suffix = "".join(f"-{k}={v}" for k, v in b.items()) + ("" if mode == "all" else f"-{mode}")
                    yield pytest.param(op, i, b, mode, id=f"{op}-{i}{suffix}", marks=marks)


def test_every_differentiable_op_is_checked_numerically():
    unchecked = sorted(op for op, cases in _vjp_cases().items() if not any(_checkable(op, c) for c in cases))
    assert not unchecked, f"differentiable ops with no case having a float operand and a float result: {unchecked}"


def _kink_distance(op: str, attrs: dict, arrays: list[np.ndarray]) -> float:
    """How far the inputs are from a point where ``op`` is not differentiable (inf: nowhere near)."""
    if op in ("relu", "leaky_relu", "abs"):
        return float(np.abs(arrays[0]).min(initial=np.inf))
    if op in ("maximum", "minimum"):
        return float(np.abs(arrays[0] - arrays[1]).min(initial=np.inf))
    if op == "max":  # the gap between the largest and second largest element of each reduced group
        x, axes = arrays[0], tuple(attrs["axes"])
        if not axes or x.size == 0:
            return np.inf
        kept = [a for a in range(x.ndim) if a not in axes]
        groups = np.transpose(x, kept + list(axes)).reshape(int(np.prod([x.shape[a] for a in kept])), -1)
        if groups.shape[1] < 2:
            return np.inf
        top2 = np.sort(groups, axis=1)[:, -2:]
        return float((top2[:, 1] - top2[:, 0]).min(initial=np.inf))
    return np.inf


def _loss_graph(op: str, c: OpCase, mode: str = "all") -> tuple[Graph, list[str]]:
    """float64 ``L = Σ_k sum(out_k * u_k)`` over the float outputs of a one-node graph (only the
    first with mode "first"); returns the graph, the names of its float operands to differentiate
    (only those listed with mode "wrt=x0,x1"). The u_k are input arguments %u0, %u1, ..."""
    g = build_graph(op, c)
    b = GraphBuilder.extend(g, f"{op}_loss")
    (node,) = g.nodes
    chosen = _float_outputs(op, c)[: 1 if mode == "first" else None]
    terms = []
    for k in chosen:
        out = node.outputs[k]
        u = b.arg(f"u{k}", out.type, ArgKind.input, exact=True)
        prod = b.emit1("mul", out, u, hint=f"uo{k}")
        terms.append(b.emit1("sum", prod, attrs={"axes": list(range(out.type.rank))}, hint=f"s{k}")
                     if out.type.rank else prod)
    loss = terms[0]
    for t in terms[1:]:
        loss = b.emit1("add", loss, t, hint="loss")
    g64 = with_float(b.finish([loss]), DType.f64)
    wrt = [f"x{i}" for i, t in enumerate(c.types) if t.dtype.is_float]
    if mode.startswith("wrt="):
        wrt = [name for name in wrt if name in mode[4:].split(",")]
    return g64, wrt


def _feeds(g64: Graph, op: str, c: OpCase, bindings: dict) -> dict[str, np.ndarray]:
    """float64 inputs away from kinks (re-drawn until they are), and the u arrays."""
    g = build_graph(op, c)
    for seed in range(50):
        rng = np.random.default_rng(seed)
        base = feeds_for(g, c, bindings, rng)
        arrays = [base[f"x{i}"] for i in range(len(c.types))]
        if _kink_distance(op, get_op(op).normalize_attrs(c.attrs), arrays) > KINK_MARGIN:
            break
    else:
        raise AssertionError(f"{op}: no inputs found at least {KINK_MARGIN} away from a kink")
    feeds = {}
    for _, v in g64.args:
        a = base[v.name] if v.name in base else rng.standard_normal(v.type.concrete(bindings))
        feeds[v.name] = np.asarray(a).astype(v.type.dtype.np)
    return feeds


def _loss(g64: Graph, feeds: dict[str, np.ndarray]) -> float:
    return float(interpret(g64, feeds).outputs[0])


def _directional_fd(g64: Graph, feeds: dict, name: str, v: np.ndarray, h: float = H) -> float:
    """(L(-2h) - 8 L(-h) + 8 L(h) - L(2h)) / 12h along ``v`` for argument ``name``."""

    def at(t: float) -> float:
        return _loss(g64, {**feeds, name: feeds[name] + t * v})

    return (at(-2 * h) - 8 * at(-h) + 8 * at(h) - at(2 * h)) / (12 * h)


def _check_gradients(g64: Graph, grads: Gradients, feeds: dict, wrt: list[str], seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    result = interpret(grads.graph, feeds)
    np.testing.assert_allclose(result.outputs[0], _loss(g64, feeds), rtol=1e-12, atol=1e-12,
                               err_msg="the joint graph changed the loss")
    got = dict(zip(grads.grads, result.outputs[len(g64.outputs):], strict=True))
    assert list(got) == wrt
    for name in wrt:
        x = feeds[name]
        assert got[name].shape == x.shape and got[name].dtype == x.dtype, name
        v = rng.standard_normal(x.shape)
        v /= max(np.linalg.norm(v), 1e-300)
        analytic = float(np.sum(got[name] * v))
        numeric = _directional_fd(g64, feeds, name, v)
        assert abs(analytic - numeric) <= RTOL * max(abs(analytic), abs(numeric)) + ATOL, \
            f"d loss / d %{name} along v: vjp gives {analytic!r}, finite differences {numeric!r}"


@pytest.mark.parametrize(("op", "index", "bindings", "mode"), list(_vjp_params()))
def test_vjp_matches_finite_differences(op, index, bindings, mode):
    c = _vjp_cases()[op][index]
    g64, wrt = _loss_graph(op, c, mode)
    grads = differentiate(g64, wrt=wrt)
    feeds = _feeds(g64, op, c, bindings)
    _check_gradients(g64, grads, feeds, wrt)


def test_batch_norm_train_loss_through_the_running_mean_only():
    b = GraphBuilder("bn")
    names, types = ["x", "gamma", "beta", "mean", "var"], ["f64[N,3]", "f64[3]", "f64[3]", "f64[3]", "f64[3]"]
    args = [b.arg(n, as_type(t), exact=True) for n, t in zip(names, types, strict=True)]
    _, new_mean, _ = b.emit("batch_norm_train", args, {"momentum": 0.25})
    g = b.finish([b.emit1("sum", new_mean, attrs={"axes": [0]}, hint="loss")])
    grads = differentiate(g, wrt=["x", "mean"])
    rng = np.random.default_rng(0)
    feeds = {n: rng.uniform(0.5, 2.0, v.type.concrete({"N": 4})) for n, (_, v) in zip(names, g.args, strict=True)}
    _, gx, gmean = interpret(grads.graph, feeds).outputs
    np.testing.assert_allclose(gx, np.full((4, 3), 0.25 / 4), rtol=1e-12)
    np.testing.assert_allclose(gmean, np.full(3, 0.75), rtol=1e-12)


def _max_tie_gradient(x: np.ndarray, u: np.ndarray, axes: list[int], keepdims: bool) -> np.ndarray:
    """d Σ(u · max(x, axes)) / dx from the IR, in float64."""
    b = GraphBuilder("max_ties")
    xv = b.arg("x", TensorType(DType.f64, x.shape), exact=True)
    y = b.emit1("max", xv, attrs={"axes": axes, "keepdims": keepdims})
    uv = b.arg("u", y.type, exact=True)
    loss = b.emit1("sum", b.emit1("mul", y, uv), attrs={"axes": list(range(y.type.rank))}, hint="loss")
    grads = differentiate(b.finish([loss]), wrt=["x"])
    return interpret(grads.graph, {"x": x, "u": u}).outputs[1]


@pytest.mark.parametrize("keepdims", [False, True])
def test_max_ties_share_the_gradient_evenly(keepdims):
    """A max-pool over zero-padded windows: tied maximal elements split g (not k copies of g),
    as numpy's and PyTorch's amax subgradient does, so each group's gradient still sums to g."""
    x = np.array([[0.0, 0.0, 0.0, 0.0],  # four-way tie
                  [1.0, 3.0, 3.0, -2.0],  # two-way tie
                  [5.0, 0.0, 0.0, 1.0]])  # a single maximum
    u = np.array([2.0, -1.0, 4.0])
    got = _max_tie_gradient(x, u.reshape(3, 1) if keepdims else u, [1], keepdims)
    mask = x == x.max(axis=1, keepdims=True)
    np.testing.assert_array_equal(got, mask * (u / mask.sum(axis=1))[:, None])
    np.testing.assert_array_equal(got.sum(axis=1), u)
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, requires_grad=True)
    torch.amax(xt, dim=1, keepdim=keepdims).backward(torch.tensor(u.reshape(3, 1) if keepdims else u))
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=0, atol=1e-15)


def test_max_ties_over_several_axes():
    x = np.zeros((2, 3, 2))
    x[1, 0, 1] = x[1, 2, 0] = 1.0  # two maxima in group 1, six in group 0
    got = _max_tie_gradient(x, np.array([6.0, 1.0]), [1, 2], False)
    np.testing.assert_array_equal(got[0], np.ones((3, 2)))
    np.testing.assert_array_equal(got[1], np.where(x[1] == 1.0, 0.5, 0.0))


def test_the_finite_difference_check_catches_a_wrong_rule():
    """A relu whose rule forgets the mask is caught (the check is not vacuous)."""
    relu = get_op("relu")
    original = relu.vjp
    c = CASES["relu"][0]
    g64, wrt = _loss_graph("relu", c)
    object.__setattr__(relu, "vjp", lambda ctx, g: [g])  # OpDef is frozen; restored below
    try:
        grads = differentiate(g64, wrt=wrt)
    finally:
        object.__setattr__(relu, "vjp", original)
    with pytest.raises(AssertionError, match="finite differences"):
        _check_gradients(g64, grads, _feeds(g64, "relu", c, {"N": 3}), wrt)


# ---- 3. readable backward IR -----------------------------------------------------------------
def _backward(grads: Gradients, forward: Graph) -> list[Node]:
    return grads.graph.nodes[len(forward.nodes):]


def _mlp() -> Graph:
    """x -> fc1 -> relu -> fc2 -> softmax cross-entropy, with a location and scope on every node."""
    b = GraphBuilder("mlp")
    x = b.arg("x", as_type("f32[N,4]"), exact=True)
    y = b.arg("y", as_type("i64[N]"), exact=True)
    w1 = b.arg("fc1.weight", as_type("f32[4,5]"), ArgKind.param, exact=True)
    b1 = b.arg("fc1.bias", as_type("f32[5]"), ArgKind.param, exact=True)
    w2 = b.arg("fc2.weight", as_type("f32[5,3]"), ArgKind.param, exact=True)
    h = b.emit1("matmul", x, w1, loc=SourceLoc("mlp.py", 10), scope="fc1")
    h = b.emit1("add", h, b1, loc=SourceLoc("mlp.py", 10), scope="fc1", hint="fc1")
    r = b.emit1("relu", h, loc=SourceLoc("mlp.py", 11), hint="relu")
    z = b.emit1("matmul", r, w2, loc=SourceLoc("mlp.py", 12), scope="fc2", hint="fc2")
    loss = b.emit1("softmax_cross_entropy", z, y, loc=SourceLoc("mlp.py", 13), scope="loss", hint="loss")
    return b.finish([loss])


def _mlp_feeds(g: Graph, n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for _, v in g.args:
        shape = v.type.concrete({"N": n})
        a = rng.integers(0, 3, size=shape) if v.type.dtype.is_int else rng.standard_normal(shape)
        feeds[v.name] = np.asarray(a).astype(v.type.dtype.np)
    return feeds


def _one_op(op: str, *types: str, **attrs) -> tuple[Graph, Node]:
    b = GraphBuilder(f"{op}_graph")
    args = [b.arg(f"a{i}", as_type(t), exact=True) for i, t in enumerate(types)]
    out = b.emit1(op, *args, attrs=attrs, loc=SourceLoc("m.py", 7), scope="layer", hint="out")
    if out.type.rank:
        out = b.emit1("sum", out, attrs={"axes": list(range(out.type.rank))}, hint="loss")
    return b.finish([out]), b.nodes[0]


def test_softmax_cross_entropy_backward_is_one_closed_form_node():
    g, _ = _one_op("softmax_cross_entropy", "f32[N,10]", "i64[N]")
    back = _backward(differentiate(g, wrt=["a0"]), g)
    seed, *rest = back
    assert seed.note == "dL/dL = 1"
    (node,) = rest
    assert node.op == "softmax_cross_entropy_grad"
    assert "(softmax(z) - onehot(y)) / n" in node.note
    assert node.note.startswith("vjp(softmax_cross_entropy) of %out")


def test_mse_backward_is_mse_grad():
    g, _ = _one_op("mse", "f32[N,4]", "f32[N,4]")
    _, node = _backward(differentiate(g, wrt=["a0"]), g)
    assert node.op == "mse_grad" and "2 (p - y) / n" in node.note
    _, dp, dt = _backward(differentiate(g, wrt=["a0", "a1"]), g)
    assert dp.op == "mse_grad" and dt.op == "neg" and dt.inputs == (dp.outputs[0],)
    assert "wrt target: -2 (p - y) / n" in dt.note


def test_relu_backward_is_a_mask_and_a_where():
    g, _ = _one_op("relu", "f32[N,4]")
    back = [n for n in _backward(differentiate(g, wrt=["a0"]), g) if n.note and n.note.startswith("vjp(relu)")]
    assert [n.op for n in back] == ["gt", "where"]
    mask, where = back
    assert "x > 0" in mask.note and "g * (x > 0)" in where.note
    assert where.inputs[0] is mask.outputs[0]


def test_matmul_backward_is_two_matmuls():
    g, fwd = _one_op("matmul", "f32[N,4]", "f32[4,5]")
    back = [n for n in _backward(differentiate(g, wrt=["a0", "a1"]), g) if n.note.startswith("vjp(matmul)")]
    assert [n.op for n in back] == ["matmul", "matmul"]
    lhs, rhs = back
    assert "wrt lhs: g·bᵀ" in lhs.note and lhs.attrs == {"transpose_a": False, "transpose_b": True}
    assert "wrt rhs: aᵀ·g" in rhs.note and rhs.attrs == {"transpose_a": True, "transpose_b": False}
    assert lhs.inputs[1] is fwd.inputs[1] and rhs.inputs[0] is fwd.inputs[0]


_OF = re.compile(r"^vjp\((\w+)\) of %(\S+?)(?: wrt [^:]+)?: .+")


def _is_shared_scalar(n: Node) -> bool:
    """GraphBuilder.scalar's constants (%c0, %c0.5) are shared by every user, forward and backward
    alike, so they carry no note, location or scope of their own."""
    return n.op == "const" and n.attrs["shape"] == () and n.note is None


def test_every_backward_node_names_its_rule_and_carries_the_forward_location():
    g = _mlp()
    grads = differentiate(g)
    producers = g.producers()
    by_name = {v.name: v for v in g.values()}
    back = _backward(grads, g)
    assert back[0].note == "dL/dL = 1" and back[0].op == "const"
    ruled = 0
    for n in back[1:]:
        if _is_shared_scalar(n):
            continue
        assert n.note and (n.note.startswith("vjp(") or n.note.startswith("accumulate")), \
            f"backward node %{n.outputs[0].name} = {n.op} has note {n.note!r}"
        m = _OF.match(n.note)
        if n.note.startswith("vjp("):
            assert m, f"unreadable note {n.note!r}"
            forward = producers[by_name[m.group(2)]]
            assert forward.op == m.group(1)
            assert (n.loc, n.scope) == (forward.loc, forward.scope), \
                f"%{n.outputs[0].name} ({n.note}) should carry {forward.loc} @{forward.scope}, has {n.loc} @{n.scope}"
            ruled += 1
    assert ruled >= 7  # xent_grad, sum (bias), 2 matmuls (fc2), gt + where (relu), matmul (fc1 weight)
    _check_gradients(with_float(g), differentiate(with_float(g)), _mlp_feeds(with_float(g)),
                     ["fc1.weight", "fc1.bias", "fc2.weight"])


# ---- 4. accumulation, broadcasts, pruning ----------------------------------------------------
def _unary_graph(build) -> Graph:
    b = GraphBuilder("g")
    x = b.arg("x", as_type("f64[N,3]"), exact=True)
    y = build(b, x)
    return b.finish([b.emit1("sum", y, attrs={"axes": [0, 1]}, hint="loss")])


def test_value_used_twice_gets_its_cotangents_summed():
    g = _unary_graph(lambda b, x: b.emit1("mul", x, x, hint="sq"))
    grads = differentiate(g, wrt=["x"])
    acc = [n for n in _backward(grads, g) if n.note and n.note.startswith("accumulate")]
    assert len(acc) == 1 and acc[0].op == "add" and "%x is used 2 times" in acc[0].note
    assert grads.grads["x"] is acc[0].outputs[0]
    x = np.random.default_rng(0).standard_normal((2, 3))
    (_, gx) = interpret(grads.graph, {"x": x}).outputs
    np.testing.assert_allclose(gx, 2 * x, rtol=1e-14)


def test_two_branches_are_summed():
    g = _unary_graph(lambda b, x: b.emit1("add", b.emit1("tanh", x), b.emit1("exp", x), hint="z"))
    grads = differentiate(g, wrt=["x"])
    assert any(n.op == "add" and n.note.startswith("accumulate") for n in _backward(grads, g))
    x = np.random.default_rng(0).standard_normal((4, 3))
    (_, gx) = interpret(grads.graph, {"x": x}).outputs
    np.testing.assert_allclose(gx, 1 - np.tanh(x) ** 2 + np.exp(x), rtol=1e-13)
    _check_gradients(g, grads, {"x": x}, ["x"])


def test_broadcast_is_undone_by_a_sum():
    g, _ = _one_op("add", "f32[N,4]", "f32[4]")
    grads = differentiate(g, wrt=["a0", "a1"])
    (undo,) = [n for n in _backward(grads, g) if n.note.startswith("vjp(add)")]
    assert undo.op == "sum" and undo.attrs == {"axes": (0,), "keepdims": False} and "wrt rhs" in undo.note
    assert grads.grads["a1"] is undo.outputs[0] and undo.outputs[0].type == as_type("f32[4]")
    assert grads.grads["a0"].type == as_type("f32[N,4]")


def test_stretched_axis_is_summed_and_reshaped():
    g, _ = _one_op("mul", "f64[N,1,3]", "f64[2,1]")
    grads = differentiate(g, wrt=["a0", "a1"])
    assert grads.grads["a0"].type == as_type("f64[N,1,3]") and grads.grads["a1"].type == as_type("f64[2,1]")
    rng = np.random.default_rng(0)
    _check_gradients(g, grads, {"a0": rng.standard_normal((3, 1, 3)), "a1": rng.standard_normal((2, 1))},
                     ["a0", "a1"])


def _two_branches() -> Graph:
    """loss = sum(tanh(x * w1)) + sum(exp(x * w2))"""
    b = GraphBuilder("two")
    x = b.arg("x", as_type("f64[N,3]"), exact=True)
    w1 = b.arg("w1", as_type("f64[3]"), ArgKind.param, exact=True)
    w2 = b.arg("w2", as_type("f64[3]"), ArgKind.param, exact=True)
    s1 = b.emit1("sum", b.emit1("tanh", b.emit1("mul", x, w1, hint="xw1"), hint="t"), attrs={"axes": [0, 1]})
    s2 = b.emit1("sum", b.emit1("exp", b.emit1("mul", x, w2, hint="xw2"), hint="e"), attrs={"axes": [0, 1]})
    return b.finish([b.emit1("add", s1, s2, hint="loss")])


def test_pruning_skips_the_branch_of_an_undifferentiated_param():
    g = _two_branches()
    grads = differentiate(g, wrt=["w1"])
    back = _backward(grads, g)
    w2_branch = {"xw2", "e", "sum.1", "w2"}  # x * w2, exp, its sum, w2
    assert w2_branch <= {v.name for v in g.values()}
    for n in back:
        m = _OF.match(n.note or "")
        assert not (m and m.group(2) in w2_branch), f"backward node for the w2 branch: {n.note}"
        assert not (n.note or "").startswith("vjp(add) of %loss wrt rhs"), n.note
    assert not any(v.name in w2_branch for n in back for v in n.inputs)
    assert list(grads.grads) == ["w1"]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3)), "w1": rng.standard_normal(3), "w2": rng.standard_normal(3)}
    _check_gradients(g, grads, feeds, ["w1"])
    both = differentiate(g)  # every param: now the w2 branch is differentiated
    assert any(_OF.match(n.note or "") and _OF.match(n.note).group(2) == "e" for n in _backward(both, g))


def test_integer_input_is_never_differentiated():
    b = GraphBuilder("ints")
    ids = b.arg("ids", as_type("i64[N,3]"), exact=True)
    w = b.arg("w", as_type("f64[3]"), ArgKind.param, exact=True)
    scaled = b.emit1("mul", b.emit1("cast", ids, attrs={"dtype": "f64"}, hint="idsf"), w, hint="scaled")
    g = b.finish([b.emit1("sum", scaled, attrs={"axes": [0, 1]}, hint="loss")])
    grads = differentiate(g)
    assert list(grads.grads) == ["w"]
    back = _backward(grads, g)
    assert not any((n.note or "").startswith("vjp(cast)") for n in back)
    assert not any(v.type.dtype.is_int for n in back for v in n.outputs)
    ids_val = np.arange(6).reshape(2, 3)
    (_, gw) = interpret(grads.graph, {"ids": ids_val, "w": np.ones(3)}).outputs
    np.testing.assert_allclose(gw, ids_val.sum(axis=0))


def test_param_the_loss_does_not_depend_on_gets_zero_gradient():
    b = GraphBuilder("unused")
    x = b.arg("x", as_type("f64[N,3]"), exact=True)
    w = b.arg("w", as_type("f64[3]"), ArgKind.param, exact=True)
    b.arg("idle", as_type("f64[2,N]"), ArgKind.param, exact=True)
    g = b.finish([b.emit1("sum", b.emit1("mul", x, w), attrs={"axes": [0, 1]}, hint="loss")])
    grads = differentiate(g)
    idle = grads.grads["idle"]
    (node,) = [n for n in grads.graph.nodes if idle in n.outputs]
    assert node.op == "const" and node.attrs["value"] == 0.0 and node.attrs["shape"] == (2, "N")
    assert node.note == "the loss does not depend on %idle"
    assert idle.type == as_type("f64[2,N]") and idle.name == "grad.idle"
    out = interpret(grads.graph, {"x": np.ones((4, 3)), "w": np.ones(3), "idle": np.ones((2, 4))}).outputs
    np.testing.assert_array_equal(out[2], np.zeros((2, 4)))
    np.testing.assert_array_equal(out[1], np.full(3, 4.0))


# ---- 5. errors -------------------------------------------------------------------------------
def test_non_scalar_loss_is_refused():
    b = GraphBuilder("g")
    x = b.arg("x", as_type("f32[N,4]"), exact=True)
    g = b.finish([b.emit1("tanh", x, hint="h")])
    with pytest.raises(GradfuseError, match=r"scalar float loss.*%h: f32\[N,4\]"):
        differentiate(g, wrt=["x"])


def test_integer_loss_is_refused():
    b = GraphBuilder("g")
    x = b.arg("x", as_type("i64[N]"), exact=True)
    g = b.finish([b.emit1("sum", x, attrs={"axes": [0]}, hint="total")])
    with pytest.raises(GradfuseError, match=r"scalar float loss.*i64\[\]"):
        differentiate(g)


def test_unknown_name_is_refused():
    g, _ = _one_op("tanh", "f32[N,4]")
    with pytest.raises(GradfuseError, match=r"%nope: not an argument of @tanh_graph"):
        differentiate(g, wrt=["nope"])


def test_integer_argument_is_refused():
    g, _ = _one_op("softmax_cross_entropy", "f32[N,10]", "i64[N]")
    with pytest.raises(GradfuseError, match=r"%a1: i64\[N\] is not a float"):
        differentiate(g, wrt=["a0", "a1"])

