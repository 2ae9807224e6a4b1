"""Numba CPU code for the structured kernels: GEMM calls, one-pass row kernels (softmax,
log_softmax, layer_norm, cross-entropy and its gradient) and whole-tensor templates for the
other structured and layout ops. Called by :mod:`codegen.cpu`."""

from __future__ import annotations

from dataclasses import replace

from gradfuse.ir.graph import Node, Value
from gradfuse.ir.registry import get_op

from . import blas
from .kernel_ir import CTOR, CodegenError, float_ctor, local_name


def _dim(d) -> str:
    return str(d)


def _prod(dims) -> str:
    return " * ".join(_dim(d) for d in dims) or "1"


# ---- GEMM ------------------------------------------------------------------------------------
def gemm(w, mm: Node, a: str, b: str, dest: str, alpha: str | None = None, beta: str | None = None) -> None:
    """``dest = alpha * op(a) @ op(b) + beta * dest`` with CBLAS (``blas_gemm``, see
    :mod:`codegen.blas`) or, without it, ``np.dot`` (alpha 1, beta 0 only); batch axes loop, or
    fold into rows when only the left operand has them."""
    ta, tb = mm.attrs["transpose_a"], mm.attrs["transpose_b"]
    at, bt = mm.inputs[0].type, mm.inputs[1].type
    out = mm.outputs[0].type

    def call(x: str, y: str, z: str) -> str:
        if blas.AVAILABLE:
            F = CTOR[out.dtype]
            return f"blas_gemm({ta}, {tb}, {alpha or F + '(1.0)'}, {x}, {y}, {beta or F + '(0.0)'}, {z})"
        assert alpha is beta is None, "np.dot has no alpha and beta"
        return f"np.dot({x + '.T' if ta else x}, {y + '.T' if tb else y}, {z})"

    if at.rank == 2 and bt.rank == 2:
        w(call(a, b, dest))
        return
    if bt.rank == 2 and not ta:  # [..., M, K] @ [K, N]: one GEMM over all rows
        k = at.shape[-1]
        w(call(f"{a}.reshape(({_prod(at.shape[:-1])}, {_dim(k)}))", b,
               f"{dest}.reshape(({_prod(out.shape[:-1])}, {_dim(out.shape[-1])}))"))
        return
    batch = out.shape[:-2]
    ivars = [f"g{i}" for i in range(len(batch))]
    for d, i in zip(batch, ivars, strict=True):
        w(f"for {i} in range({_dim(d)}):")
        w.indent()

    def pick(name: str, t) -> str:
        lead = t.rank - 2
        idx = [("0" if t.shape[j] == 1 and batch[len(batch) - lead + j] != 1 else ivars[len(batch) - lead + j])
               for j in range(lead)]
        return f"{name}[{', '.join(idx)}]" if idx else name

    w(call(pick(a, at), pick(b, bt), f"{dest}[{', '.join(ivars)}]"))
    w.dedent(len(batch))


# ---- one-pass row kernels ----------------------------------------------------------------------
class RowCtx:
    """Code for one row: input element accessors and per-row statistics shared by the anchors."""

    def __init__(self, kp, x: Value, ftype: str):
        self.kp, self.w, self.x, self.F = kp, kp.w, x, ftype
        self.stats: dict[str, str] = {}
        self.read = None  # j -> expression of x[row, j]

    def accumulate_in_prologue(self, needs: set[str], value: str):
        """Start the statistics the anchors need that one pass can give (max, mean) so the
        prologue loop accumulates them as it makes x: one pass over the row fewer."""
        F, w = self.F, self.w
        fused = [s for s in ("max", "mean") if s in needs]
        for s in fused:
            w(f"row_{s} = {F}(-np.inf)" if s == "max" else f"row_{s} = {F}(0.0)")
            self.stats[s] = f"row_{s}"

        def step():
            for s in fused:
                w(f"row_max = max(row_max, {value})" if s == "max" else f"row_mean += {value}")

        def finish():
            if "mean" in fused:
                w(f"row_mean = row_mean / {F}(C)")
        return step, finish

    def stat(self, name: str, code) -> str:
        if name not in self.stats:
            local = f"row_{name}"
            code(local)
            self.stats[name] = local
        return self.stats[name]

    def row_max(self) -> str:
        def code(local):
            self.w(f"{local} = {self.F}(-np.inf)")
            self.w(f"for j in range(C):\n{'    ' * (self.w.depth + 1)}{local} = max({local}, {self.read('j')})")
        return self.stat("max", code)

    def row_sumexp(self) -> str:
        """Σ e^(x_j - m), or ``more + 1 + below`` where :meth:`row_sumexp_parts` ran."""
        m = self.row_max()

        def code(local):
            self.w(f"{local} = {self.F}(0.0)")
            self.w("for j in range(C):")
            self.w.indent()
            self.w(f"{local} += fast_exp_{self.F}({self.read('j')} - {m})")
            self.w.dedent()
        return self.stat("sumexp", code)

    def row_sumexp_parts(self) -> tuple[str, str]:
        """(more, below) from one loop: how many x_j beyond one equal the max m, and Σ e^(x_j - m)
        over the x_j below m. ``more + below`` is sumexp - 1 without the rounding of 1 + (something
        tiny): what a confident row's cross-entropy is made of. A NaN x_j lands in ``below``. Ask
        before :meth:`row_sumexp` (which then adds them up): the split costs the plain loop ~8%."""
        if "below" not in self.stats:
            assert "sumexp" not in self.stats, "the parts after the plain sum: a second loop"
            m, F, w = self.row_max(), self.F, self.w
            w(f"row_more = {F}(-1.0)")
            w(f"row_below = {F}(0.0)")
            w("for j in range(C):")
            w.indent()
            w(f"d = {self.read('j')} - {m}")
            # products, not branches, so that the loop vectorises (a conditional add ran 5x slower);
            # not e - [d == 0] either, which reassociation turns into Σe - Σ[d == 0] (1 + tiny - 1)
            w(f"row_more += {F}(d == {F}(0.0))")
            w(f"row_below += fast_exp_{F}(d) * {F}(d != {F}(0.0))")
            w.dedent()
            w(f"row_sumexp = (row_more + {F}(1.0)) + row_below")
            self.stats.update(more="row_more", below="row_below", sumexp="row_sumexp")
        return self.stats["more"], self.stats["below"]

    def row_moments(self) -> tuple[str, str]:
        def mean(local):
            self.w(f"{local} = {self.F}(0.0)")
            self.w("for j in range(C):")
            self.w.indent()
            self.w(f"{local} += {self.read('j')}")
            self.w.dedent()
            self.w(f"{local} = {local} / {self.F}(C)")

        m = self.stat("mean", mean)

        def var(local):
            self.w(f"{local} = {self.F}(0.0)")
            self.w("for j in range(C):")
            self.w.indent()
            self.w(f"d = {self.read('j')} - {m}")
            self.w(f"{local} += d * d")
            self.w.dedent()
            self.w(f"{local} = {local} / {self.F}(C)")

        return m, self.stat("var", var)


def _row_softmax(ctx: RowCtx, n: Node, out: str, lead: list[str]) -> None:
    m, s = ctx.row_max(), ctx.row_sumexp()
    w = ctx.w
    w(f"inv = {ctx.F}(1.0) / {s}")
    w("for j in range(C):")
    w.indent()
    w(f"{out}[j] = fast_exp_{ctx.F}({ctx.read('j')} - {m}) * inv")
    w.dedent()


def _row_log_softmax(ctx: RowCtx, n: Node, out: str, lead: list[str]) -> None:
    m, s = ctx.row_max(), ctx.row_sumexp()
    w = ctx.w
    w(f"lse = {m} + math.log({s})")
    w("for j in range(C):")
    w.indent()
    w(f"{out}[j] = {ctx.read('j')} - lse")
    w.dedent()


def _label(ctx: RowCtx, n: Node, lead: list[str]) -> str:
    labels = n.inputs[1]
    return f"{ctx.kp.arr(labels)}[{', '.join(lead)}]" if lead else ctx.kp.scalar(labels)  # 0-d: read on entry


def _row_xent(ctx: RowCtx, n: Node, acc: str, lead: list[str]) -> None:
    """-log softmax(x)[label] = (m - x[label]) + log1p(sumexp - 1), as xent_ref: a confident row's
    small loss is never rounded at the size of m or of 1. ``abs`` of m - x[label] (>= 0 anyway) is
    an intrinsic that fastmath's reassociation does not see through: without it LLVM sums
    ``acc + m - x[label] + ...`` in an order that rounds at m again (measured: 6e-2 relative)."""
    m, (more, below) = ctx.row_max(), ctx.row_sumexp_parts()
    ctx.w(f"{acc} += abs({m} - {ctx.read(_label(ctx, n, lead))}) + math.log1p({more} + {below})")


def _row_xent_grad(ctx: RowCtx, n: Node, out: str, lead: list[str]) -> None:
    m, s = ctx.row_max(), ctx.row_sumexp()
    w = ctx.w
    g = ctx.kp.scalar(n.inputs[2])
    w(f"lbl = {_label(ctx, n, lead)}")
    w(f"scale = {g} / ({ctx.F}(R) * {s})")
    w(f"hit = {g} / {ctx.F}(R)")
    # the label's (p - 1) g / R as one product, as xent_grad_ref: p g/R - g/R is inf - inf (NaN)
    # for an infinite g; read before the loop, which may overwrite the row in place
    w(f"p_lbl = fast_exp_{ctx.F}({ctx.read('lbl')} - {m}) / {s}")
    w("for j in range(C):")
    w.indent()
    w(f"{out}[j] = fast_exp_{ctx.F}({ctx.read('j')} - {m}) * scale")
    w.dedent()
    w(f"{out}[lbl] = (p_lbl - {ctx.F}(1.0)) * hit")


def _row_layer_norm(ctx: RowCtx, n: Node, out: str, lead: list[str]) -> None:
    mean, var = ctx.row_moments()
    w = ctx.w
    gamma, beta = (ctx.kp.arr(v) for v in n.inputs[1:3])
    w(f"rstd = {ctx.F}(1.0) / math.sqrt({var} + {ctx.F}({n.attrs['eps']!r}))")
    w("for j in range(C):")
    w.indent()
    w(f"{out}[j] = ({ctx.read('j')} - {mean}) * rstd * {gamma}[j] + {beta}[j]")
    w.dedent()


# the one-pass row templates, by the name an op's record gives (``lowering["template"]``)
ROW_TEMPLATES = {"softmax_rows": _row_softmax, "log_softmax_rows": _row_log_softmax,
                 "layer_norm_rows": _row_layer_norm, "xent_rows": _row_xent, "xent_grad_rows": _row_xent_grad}


def template(n: Node) -> str | None:
    return get_op(n.op).lowering.get("template")


def scalar_result(n: Node) -> bool:
    """One value per row, accumulated over the rows (a loss), rather than a row per row."""
    return get_op(n.op).lowering.get("row_result") == "scalar"


def _direct_row_output(k, x: Value, axis: int) -> Value | None:
    """The anchor result that can be written straight into its output buffer's row (which then
    also holds x while the row is worked on): the last anchor, the only one with a row result,
    written out with no epilogue, along the last axis. Each element of the row is read before it
    is written, so this holds even where the memory plan lets the output share x's storage."""
    rowwise = [a for a in k.anchors if not scalar_result(a)]
    if len(rowwise) != 1 or rowwise[0] is not k.anchors[-1] or k.epilogue is not None:
        return None
    v = rowwise[0].outputs[0]
    return v if v in k.writes and axis == x.type.rank - 1 else None


def row_axis(n: Node) -> int:
    """The axis a row op reduces (its record's ``row_axis``: softmax's ``axis``, else the last)."""
    return get_op(n.op).row_axis(n)


def row_kernel(kp) -> None:
    """For r in rows: prologue into a row buffer (the output row when the op writes straight to
    it), accumulating the first statistic as it goes; the anchors (sharing max / sum-exp / moments),
    then the epilogue; results one scalar per row are summed over rows (a prange reduction).
    A row runs along ``row_axis`` (not necessarily the last): the other axes are unravelled from r."""
    k, w = kp.k, kp.w
    x = k.anchors[0].inputs[0]
    axis = row_axis(k.anchors[0])
    lead_dims = [d for i, d in enumerate(x.type.shape) if i != axis]
    ftype = float_ctor(k.anchors[0])
    w(f"R = {_prod(lead_dims)}")
    w(f"C = {_dim(x.type.shape[axis])}")
    accs = {}
    for a in k.anchors:
        if scalar_result(a):
            accs[a] = f"acc_{local_name(a.outputs[0])[2:]}"
            w(f"{accs[a]} = {ftype}(0.0)")
    w(f"for r in {'prange' if kp.parallel_rows else 'range'}(R):")
    w.indent()
    lead = [f"i{d}" for d in range(x.type.rank) if d != axis]
    rest = "r"
    for d in range(len(lead_dims) - 1, -1, -1):  # unravel r into the other indices
        w(f"{lead[d]} = {rest} % {_dim(lead_dims[d])}" if d else f"{lead[d]} = {rest}")
        if d:
            w(f"q{d} = {rest} // {_dim(lead_dims[d])}")
            rest = f"q{d}"
    jv = f"i{axis}"
    full = [*lead[:axis], jv, *lead[axis:]]  # the index of x[row, j] in axis order

    def at(j: str) -> str:
        return ", ".join([*lead[:axis], j, *lead[axis:]])

    ctx = RowCtx(kp, x, ftype)
    xa = kp.arr(x)
    ctx.read = lambda j: f"{xa}[{at(j)}]"
    direct = _direct_row_output(k, x, axis)

    def row_of(v: Value) -> str:  # the row of v's buffer, a view
        return f"{kp.arr(v)}[{', '.join(lead)}]" if lead else kp.arr(v)
    if k.prologue is not None:  # x (when the prologue makes it) into a row buffer
        made = any(s.node.outputs[0] is x for s in k.prologue.stmts)
        step = finish = None
        if made:
            scratch = direct is not None and direct.type.dtype == x.type.dtype
            w(f"t_x = {row_of(direct)}" if scratch else f"t_x = np.empty(C, {CTOR[x.type.dtype]})")
            ctx.read = lambda j: f"t_x[{j}]"
            stats = {get_op(a.op).lowering["row_stat"] for a in k.anchors}
            step, finish = ctx.accumulate_in_prologue(stats, local_name(x))
        w(f"for {jv} in range(C):")
        w.indent()
        kp.loop_body(k.prologue, full)
        if made:
            w(f"t_x[{jv}] = {local_name(x)}")
            step()
        w.dedent()
        if made:
            finish()
    if any(ROW_TEMPLATES[template(a)] is _row_xent for a in k.anchors):
        ctx.row_sumexp_parts()  # first: the anchors that want the plain sum then share its loop
    row_outs = {}
    for a in k.anchors:
        emit = ROW_TEMPLATES[template(a)]
        if scalar_result(a):
            emit(ctx, a, accs[a], lead)
        elif a.outputs[0] is direct:
            w(f"o_{local_name(direct)[2:]} = {row_of(direct)}")
            emit(ctx, a, f"o_{local_name(direct)[2:]}", lead)
        else:
            row_outs[a.outputs[0]] = f"o_{local_name(a.outputs[0])[2:]}"
            w(f"{row_outs[a.outputs[0]]} = np.empty(C, {CTOR[a.outputs[0].type.dtype]})")
            emit(ctx, a, row_outs[a.outputs[0]], lead)
    if row_outs:
        w(f"for {jv} in range(C):")
        w.indent()
        extra = {}
        for v, o in row_outs.items():
            w(f"{local_name(v)} = {o}[{jv}]")
            extra[local_name(v)] = local_name(v)
            if v in k.writes:
                w(f"{kp.arr(v)}[{at(jv)}] = {local_name(v)}")
        if k.epilogue is not None:
            kp.loop_body(k.epilogue, full, extra)
        w.dedent()
    w.dedent()
    for a, acc in accs.items():
        v = a.outputs[0]
        w(f"{local_name(v)} = {acc} / {ftype}(R)")
        if v in k.writes:
            w(f"{kp.arr(v)}[()] = {local_name(v)}")
    if k.finale is not None:
        kp.loop_body(k.finale, [])


# ---- whole-tensor templates ------------------------------------------------------------------
def whole_tensor_kernel(kp) -> None:
    """Prologue into temporaries, each anchor's template over whole tensors (an MSE and its
    gradient share a kernel; row ops along different axes of one tensor take a pass each), then
    the epilogue and finale loops."""
    k, w = kp.k, kp.w
    inputs = {v for a in k.anchors for v in a.inputs}
    outputs = [v for a in k.anchors for v in a.outputs]
    if k.prologue is not None:  # into temporaries: the templates read whole tensors
        temps = [s.node.outputs[0] for s in k.prologue.stmts
                 if s.node.outputs[0] in inputs and s.node.outputs[0] not in k.writes]
        for v in temps:
            w(f"{kp.arr(v)} = np.empty({_shape(v)}, {CTOR[v.type.dtype]})")
        kp.elementwise(replace(k.prologue, stores=k.prologue.stores + [(v, local_name(v)) for v in temps]))
    for v in outputs:
        if v not in k.writes:
            w(f"{kp.arr(v)} = np.empty({_shape(v)}, {CTOR[v.type.dtype]})")
    for a in k.anchors:
        if template(a) in ROW_TEMPLATES:  # a pass over the rows of its input, which now lies in memory
            row_kernel(type(kp)(replace(k, anchors=[a], writes=list(a.outputs), prologue=None, epilogue=None,
                                        finale=None), w))
            continue
        emit = TEMPLATES.get(template(a))
        if emit is None:
            raise CodegenError(f"no CPU template {template(a)!r} for {a.op} (%{a.outputs[0].name}) in kernel "
                               f"{k.name} with {[b.op for b in k.anchors]}")
        emit(kp, a, [kp.arr(v) for v in a.inputs], [kp.arr(v) for v in a.outputs])
    for loop in (k.epilogue, k.finale):
        if loop is None:
            continue
        ivars = kp.nested(loop.space, False)
        used = {u for s in loop.stmts for u in s.node.inputs}
        kp.loop_body(loop, ivars, {local_name(v): f"{kp.arr(v)}{store_index(v, loop.space, ivars)}"
                                   for v in outputs if v in used})
        w.dedent(len(loop.space))


def store_index(v: Value, space, ivars: list[str]) -> str:
    """Index of ``v`` (whose shape broadcasts into ``space``) at loop position ``ivars``."""
    rank = len(space)
    parts = ["0" if d == 1 and space[rank - v.type.rank + j] != 1 else ivars[rank - v.type.rank + j]
             for j, d in enumerate(v.type.shape)]
    return _ix(parts)


def _shape(v: Value) -> str:
    return "(" + "".join(f"{_dim(d)}, " for d in v.type.shape) + ")"


def _loops(w, shape) -> list[str]:
    ivars = [f"i{d}" for d in range(len(shape))]
    for d, i in zip(shape, ivars, strict=True):
        w(f"for {i} in range({_dim(d)}):")
        w.indent()
    return ivars


def _ix(ivars) -> str:
    return "[" + ", ".join(ivars) + "]" if ivars else "[()]"


def _transpose(kp, n, ins, outs):
    w = kp.w
    perm = n.attrs["perm"]
    ivars = _loops(w, n.outputs[0].type.shape)
    src = [None] * len(perm)
    for out_axis, in_axis in enumerate(perm):
        src[in_axis] = ivars[out_axis]
    w(f"{outs[0]}{_ix(ivars)} = {ins[0]}{_ix(src)}")
    w.dedent(len(ivars))


def _broadcast_to(kp, n, ins, outs):
    w = kp.w
    x, y = n.inputs[0], n.outputs[0]
    ivars = _loops(w, y.type.shape)
    off = y.type.rank - x.type.rank
    src = ["0" if d == 1 and y.type.shape[off + j] != 1 else ivars[off + j] for j, d in enumerate(x.type.shape)]
    w(f"{outs[0]}{_ix(ivars)} = {ins[0]}{_ix(src)}")
    w.dedent(len(ivars))


def _slice(kp, n, ins, outs):
    w = kp.w
    a = n.attrs
    ivars = _loops(w, n.outputs[0].type.shape)
    src = list(ivars)
    src[a["axis"]] = f"{a['start']} + {ivars[a['axis']]} * {a['step']}"
    w(f"{outs[0]}{_ix(ivars)} = {ins[0]}{_ix(src)}")
    w.dedent(len(ivars))


def _slice_grad(kp, n, ins, outs):
    w = kp.w
    a = n.attrs
    w(f"{outs[0]}[...] = 0")
    ivars = _loops(w, n.inputs[0].type.shape)
    dst = list(ivars)
    dst[a["axis"]] = f"{a['start']} + {ivars[a['axis']]} * {a['step']}"
    w(f"{outs[0]}{_ix(dst)} = {ins[0]}{_ix(ivars)}")
    w.dedent(len(ivars))


def _concat(kp, n, ins, outs):
    w = kp.w
    axis, offset = n.attrs["axis"], 0
    for v, name in zip(n.inputs, ins, strict=True):
        ivars = _loops(w, v.type.shape)
        dst = list(ivars)
        dst[axis] = f"{offset} + {ivars[axis]}"
        w(f"{outs[0]}{_ix(dst)} = {name}{_ix(ivars)}")
        w.dedent(len(ivars))
        offset += v.type.shape[axis]


def _embedding(kp, n, ins, outs):
    w = kp.w
    table, ids = n.inputs
    ivars = _loops(w, ids.type.shape)
    w(f"row = {ins[1]}{_ix(ivars)}")
    w(f"for d in range({_dim(table.type.shape[1])}):")
    w(f"    {outs[0]}[{', '.join(ivars + ['d'])}] = {ins[0]}[row, d]")
    w.dedent(len(ivars))


def _embedding_grad(kp, n, ins, outs):
    w = kp.w
    ids, g = n.inputs
    w(f"{outs[0]}[...] = 0")
    ivars = _loops(w, ids.type.shape)
    w(f"row = {ins[0]}{_ix(ivars)}")
    w(f"for d in range({_dim(g.type.shape[-1])}):")
    w(f"    {outs[0]}[row, d] += {ins[1]}[{', '.join(ivars + ['d'])}]")
    w.dedent(len(ivars))


def _flat2(name: str, v: Value) -> str:
    return f"{name}.reshape(({_prod(v.type.shape[:-1])}, {_dim(v.type.shape[-1])}))"


def _mse(kp, n, ins, outs):
    w = kp.w
    F = float_ctor(n)
    p = n.inputs[0]
    w(f"acc = {F}(0.0)")
    w(f"pf = {ins[0]}.reshape(-1)")
    w(f"tf = {ins[1]}.reshape(-1)")
    w("for i in range(pf.size):")
    w("    d = pf[i] - tf[i]")
    w("    acc += d * d")
    w(f"{outs[0]}[()] = acc / {F}({_prod(p.type.shape)})")


def _mse_grad(kp, n, ins, outs):
    w = kp.w
    F = float_ctor(n)
    p = n.inputs[0]
    w(f"scale = {F}(2.0) * {kp.scalar(n.inputs[2])} / {F}({_prod(p.type.shape)})")
    w(f"pf = {ins[0]}.reshape(-1)")
    w(f"tf = {ins[1]}.reshape(-1)")
    w(f"of = {outs[0]}.reshape(-1)")
    w("for i in range(pf.size):")
    w("    of[i] = (pf[i] - tf[i]) * scale")


def _column_stats(w, F: str, eps: float) -> None:
    """Per-feature mean and 1/sqrt(var + eps) of the rows of ``x2`` into ``mean``, ``rstd`` (and
    the biased variance into ``var``), in scalar loops: array expressions cost seconds of compile."""
    w(f"mean = np.zeros(C, {F})")
    w(f"var = np.zeros(C, {F})")
    w(f"rstd = np.empty(C, {F})")
    w("for r in range(R):")
    w("    for j in range(C):")
    w("        mean[j] += x2[r, j]")
    w("for j in range(C):")
    w(f"    mean[j] = mean[j] / {F}(R)")
    w("for r in range(R):")
    w("    for j in range(C):")
    w("        d = x2[r, j] - mean[j]")
    w("        var[j] += d * d")
    w("for j in range(C):")
    w(f"    var[j] = var[j] / {F}(R)")
    w(f"    rstd[j] = {F}(1.0) / math.sqrt(var[j] + {F}({eps!r}))")


def _norm_grad(kp, n, ins, outs, over_rows: bool):
    """dx, dgamma, dbeta of a normalisation with statistics per row (layer_norm) or per column
    (batch_norm over the batch): dx = (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂)) / σ."""
    w = kp.w
    F = float_ctor(n)
    x = n.inputs[0]
    eps = n.attrs["eps"]
    gamma, dgamma, dbeta = ins[1], outs[1], outs[2]
    w(f"x2 = {_flat2(ins[0], x)}")
    w(f"g2 = {_flat2(ins[2], x)}")
    w(f"dx2 = {_flat2(outs[0], x)}")
    w(f"R, C = {_prod(x.type.shape[:-1])}, {_dim(x.type.shape[-1])}")
    w("for j in range(C):")
    w(f"    {dgamma}[j] = {F}(0.0)")
    w(f"    {dbeta}[j] = {F}(0.0)")
    if over_rows:
        w("for r in range(R):")
        w(f"    mean = {F}(0.0)")
        w("    for j in range(C):")
        w("        mean += x2[r, j]")
        w(f"    mean = mean / {F}(C)")
        w(f"    var = {F}(0.0)")
        w("    for j in range(C):")
        w("        d = x2[r, j] - mean")
        w("        var += d * d")
        w(f"    rstd = {F}(1.0) / math.sqrt(var / {F}(C) + {F}({eps!r}))")
        w(f"    s1 = {F}(0.0)")
        w(f"    s2 = {F}(0.0)")
        w("    for j in range(C):")
        w("        xh = (x2[r, j] - mean) * rstd")
        w(f"        d = g2[r, j] * {gamma}[j]")
        w("        s1 += d")
        w("        s2 += d * xh")
        w(f"        {dgamma}[j] += g2[r, j] * xh")
        w(f"        {dbeta}[j] += g2[r, j]")
        w(f"    s1 = s1 / {F}(C)")
        w(f"    s2 = s2 / {F}(C)")
        w("    for j in range(C):")
        w("        xh = (x2[r, j] - mean) * rstd")
        w(f"        dx2[r, j] = rstd * (g2[r, j] * {gamma}[j] - s1 - xh * s2)")
    else:
        _column_stats(w, F, eps)
        w(f"s1 = np.zeros(C, {F})")
        w(f"s2 = np.zeros(C, {F})")
        w("for r in range(R):")
        w("    for j in range(C):")
        w("        xh = (x2[r, j] - mean[j]) * rstd[j]")
        w(f"        d = g2[r, j] * {gamma}[j]")
        w("        s1[j] += d")
        w("        s2[j] += d * xh")
        w(f"        {dgamma}[j] += g2[r, j] * xh")
        w(f"        {dbeta}[j] += g2[r, j]")
        w("for j in range(C):")
        w(f"    s1[j] = s1[j] / {F}(R)")
        w(f"    s2[j] = s2[j] / {F}(R)")
        w("for r in range(R):")
        w("    for j in range(C):")
        w("        xh = (x2[r, j] - mean[j]) * rstd[j]")
        w(f"        dx2[r, j] = rstd[j] * (g2[r, j] * {gamma}[j] - s1[j] - xh * s2[j])")


def _batch_norm_train(kp, n, ins, outs):
    w = kp.w
    F = float_ctor(n)
    x = n.inputs[0]
    a = n.attrs
    m = a["momentum"]
    w(f"x2 = {_flat2(ins[0], x)}")
    w(f"y2 = {_flat2(outs[0], x)}")
    w(f"R, C = {_prod(x.type.shape[:-1])}, {_dim(x.type.shape[-1])}")
    _column_stats(w, F, a["eps"])
    w("for r in range(R):")
    w("    for j in range(C):")
    w(f"        y2[r, j] = (x2[r, j] - mean[j]) * rstd[j] * {ins[1]}[j] + {ins[2]}[j]")
    w("for j in range(C):")  # running statistics: the unbiased variance, as PyTorch keeps it
    w(f"    {outs[1]}[j] = {F}({1 - m!r}) * {ins[3]}[j] + {F}({m!r}) * mean[j]")
    w(f"    {outs[2]}[j] = {F}({1 - m!r}) * {ins[4]}[j] + {F}({m!r}) * (var[j] * {F}(R) / {F}(R - 1))")


def _batch_norm_infer(kp, n, ins, outs):
    w = kp.w
    F = float_ctor(n)
    x = n.inputs[0]
    w(f"x2 = {_flat2(ins[0], x)}")
    w(f"y2 = {_flat2(outs[0], x)}")
    w(f"R, C = {_prod(x.type.shape[:-1])}, {_dim(x.type.shape[-1])}")
    w("for r in range(R):")
    w("    for j in range(C):")
    w(f"        scale = {ins[1]}[j] / math.sqrt({ins[4]}[j] + {F}({n.attrs['eps']!r}))")
    w(f"        y2[r, j] = (x2[r, j] - {ins[3]}[j]) * scale + {ins[2]}[j]")


# the whole-tensor templates, by the name an op's record gives (``lowering["template"]``)
TEMPLATES = {
    "permute_copy": _transpose, "broadcast_copy": _broadcast_to, "strided_copy": _slice,
    "strided_scatter": _slice_grad, "concat_copy": _concat, "gather_rows": _embedding,
    "scatter_add_rows": _embedding_grad, "mse_total": _mse, "mse_grad_total": _mse_grad,
    "batch_norm_columns": _batch_norm_train, "batch_norm_infer_columns": _batch_norm_infer,
    "norm_grad_rows": lambda kp, n, i, o: _norm_grad(kp, n, i, o, over_rows=True),
    "norm_grad_columns": lambda kp, n, i, o: _norm_grad(kp, n, i, o, over_rows=False),
}
