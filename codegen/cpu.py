"""The Numba CPU backend: prints a kernel program as one Python module of ``@njit`` functions.

Each kernel becomes a function; a generated ``step`` function calls them in schedule order, so
running a whole program costs one dispatch from Python (the CPU analogue of a CUDA graph). The
module is written to disk and imported under a stable name, so Numba's on-disk cache works.

Kernel shapes:
- elementwise: nested loops over the output space (outer loop ``prange`` when large);
- gemm: CBLAS (numpy's OpenBLAS, :mod:`codegen.blas`) into a buffer, then the epilogue loop; an
  SGD update of the weight whose gradient it makes folds into the GEMM (alpha, beta);
- reduction: per output element over trailing axes (rows), or accumulating into an array in
  input order (leading axes, e.g. bias gradients), with prologue and epilogue;
- row: per row for softmax, log_softmax, layer_norm and cross-entropy: the prologue makes the row
  (accumulating its max or sum on the way) into the output row or a row buffer, then the op and
  the epilogue; other structured and layout ops use whole-tensor templates.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from gradfuse.files import CACHE, atomic_file
from gradfuse.ir.graph import Node, Value
from gradfuse.ir.registry import OpDef, get_op, role

from . import blas, cpu_templates
from .collectives import collective_calls, is_host
from .cpu_templates import store_index
from .kernel_ir import CTOR, Access, Kernel, KernelProgram, Loop, local_name
from .scalar_lib import helper_source, helpers_used, ordered_helpers
from .targets import TARGETS

TARGET = TARGETS["cpu"]

# At run time, loops smaller than this run serially: a parallel launch costs tens of µs, and next
# to BLAS calls (whose threads spin after returning) parallel epilogues measured slower (MLP step
# 6.5 vs 5.9 ms). A kernel gets a parallel version (and a serial twin) if its loops reach
# PARALLEL_CANDIDATE at the nominal batch: the batch size decides at run time which one runs.
PARALLEL_ELEMENTS = 1 << 20
PARALLEL_CANDIDATE = 1 << 16
NOMINAL_BATCH = 256
# x / 0 gives inf or nan as in numpy (the reference), not Python's ZeroDivisionError, whose check
# is a branch in every division of every loop
NUMPY_ERRORS = "error_model='numpy'"
# fast-math without 'nnan' and 'ninf': reassociation (vectorised reductions), FMA contraction and
# reciprocals, but inf and nan stay IEEE (with them LLVM folded x / (s - s) to a finite number)
FASTMATH = "{'reassoc', 'contract', 'arcp', 'nsz'}"
# ... and reassociation only in kernels that accumulate (reductions, row statistics), which it
# vectorises: elsewhere it only rewrites arithmetic, and x + (x - x) became x (inf where numpy's
# inf - inf gives NaN); an elementwise loop vectorises without it. Where it stays it still reaches
# the fused elementwise work ((x + m) - x gives m at x = inf); an accumulation through a helper
# compiled with 'reassoc' (LLVM inlines it, its fadd keeps the flag) measured as fast in a kernel
# without it (4M-element sum: 0.238 ms, 0.221 with 'reassoc' throughout, 3.4 without any).
FASTMATH_NO_REASSOC = "{'contract', 'arcp', 'nsz'}"
ACCUMULATING = ("reduction", "row")


def fastmath_flags(k: Kernel) -> str:
    """The fast-math flags of kernel ``k``'s function (see FASTMATH)."""
    return FASTMATH if k.kind in ACCUMULATING else FASTMATH_NO_REASSOC


def missing_lowering(op: OpDef) -> str | None:
    """Why this backend cannot print ``op``, from its record alone; None when it can."""
    low = op.lowering
    if op.role in ("view", "immediate") or "host" in low:  # host ops: the step calls the runtime
        return None
    if op.role == "elementwise":
        return None if "expr" in low else "no scalar expression (lowering['expr'])"
    if op.role == "reduction":
        return None if {"combine", "identity"} <= set(low) else "no combine and identity"
    if op.role == "gemm":
        return None if low.get("template") == "gemm" else "a GEMM without the 'gemm' template"
    t = low.get("template")
    if t in cpu_templates.ROW_TEMPLATES:
        return None if low.get("row_stat") in ("max", "mean") else f"row template {t!r} without a row_stat"
    return None if t in cpu_templates.TEMPLATES else f"no CPU template {t!r}"


def arr(v: Value) -> str:
    """The array parameter holding buffer ``v``."""
    return "b_" + local_name(v)[2:]


def size_of(shape, symbols: dict[str, int] | None = None) -> int:
    symbols = symbols or {}
    return math.prod(symbols.get(d, NOMINAL_BATCH) if isinstance(d, str) else d for d in shape)


class Writer:
    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, line: str = "") -> None:
        self.lines.append("    " * self.depth + line if line else "")

    def indent(self, n: int = 1) -> None:
        self.depth += n

    def dedent(self, n: int = 1) -> None:
        self.depth -= n


def _dim(d) -> str:
    return str(d)


def _index(access, ivars: list[str]) -> str:
    parts = ["0" if a is None else ivars[a] for a in access.axes]
    return "[" + ", ".join(parts) + "]" if parts else "[()]"


def _flat_index(space, ivars: list[str]) -> str:
    expr = "0"
    for d, i in zip(space, ivars, strict=True):
        expr = f"({expr}) * {_dim(d)} + {i}" if expr != "0" else i
    return expr


@dataclass(frozen=True)
class UpdateInGemm:
    """``new = param - lr * (op(a) @ op(b))``: one GEMM with alpha = -lr, beta = 1 into ``new``
    (which holds ``param`` already when the update is in place, else gets a copy first)."""
    param: Value
    lr: Value
    new: Value
    product: Value  # never written: nothing else reads it


def update_in_gemm(k: Kernel, prog: KernelProgram) -> UpdateInGemm | None:
    """The SGD update of a weight folded into the GEMM that makes its gradient, if ``k`` is
    exactly matmul, ``lr * g``, ``param - step`` and the gradient is read nowhere else (and the
    GEMM accumulates: CBLAS's beta)."""
    if not (blas.AVAILABLE and TARGET.gemm.accumulate) or k.kind != "gemm" or len(k.nodes) != 3 or k.finale is not None:
        return None
    mm, mul, sub = k.nodes
    g = mm.outputs[0]
    if role(mm) != "gemm" or mul.op != "mul" or sub.op != "sub" or g.type.rank != 2:
        return None
    lr = next((v for v in mul.inputs if v is not g), None)
    step = mul.outputs[0]
    if lr is None or lr.type.rank != 0 or g not in mul.inputs or sub.inputs[1] is not step:
        return None
    param, new = sub.inputs[0], sub.outputs[0]
    updates = dict((n, o) for o, n in prog.graph.updates)
    read_elsewhere = any(g in other.reads for other in prog.kernels) or g in prog.graph.outputs or any(
        isinstance(item, Node) and g in item.inputs for item in prog.schedule)
    if updates.get(new) is not param or step in k.writes or read_elsewhere or param.type != g.type:
        return None
    return UpdateInGemm(param, lr, new, g)


class KernelPrinter:
    def __init__(self, k: Kernel, w: Writer, prog: KernelProgram | None = None,
                 in_place: frozenset[str] = frozenset()):
        self.k, self.w = k, w
        self.update = update_in_gemm(k, prog) if prog is not None else None
        self.in_place = in_place
        self.params = [arr(v) for v in dict.fromkeys(k.reads + k.writes)]
        self.symbols = k.symbols

    def signature(self) -> list[str]:
        return self.params + self.symbols

    @staticmethod
    def arr(v: Value) -> str:
        return arr(v)

    def scalar(self, v: Value) -> str:
        """A scalar operand: its constant's local, or the local its buffer was read into."""
        assert local_name(v) in self.k.consts or v in self.k.reads and v.type.rank == 0, v
        return local_name(v)

    # -- loops ------------------------------------------------------------------------------
    def loop_body(self, loop: Loop, ivars: list[str], extra: dict[str, str] | None = None) -> None:
        """Loads, statements and stores of one element; ``extra`` maps values computed outside
        the loop body (anchor results) to expressions."""
        w = self.w
        if loop.uses_index:
            w(f"idx = {_flat_index(loop.space, ivars)}")
        for local, expr in (extra or {}).items():
            if local != expr:
                w(f"{local} = {expr}")
        for local, access in loop.loads:
            if access.value.type.rank:  # 0-d buffers were read at the top of the kernel
                w(f"{local} = {arr(access.value)}{_index(access, ivars)}")
        for s in loop.stmts:
            w(f"{s.local} = {s.expr}")
        for v, local in loop.stores:
            w(f"{arr(v)}{store_index(v, loop.space, ivars)} = {local}")

    def nested(self, space, parallel: bool) -> list[str]:
        """Open loops over ``space``; returns the index variables (close with dedent)."""
        ivars = [f"i{d}" for d in range(len(space))]
        for d, (dim, i) in enumerate(zip(space, ivars, strict=True)):
            rng = "prange" if parallel and d == 0 else "range"
            self.w(f"for {i} in {rng}({_dim(dim)}):")
            self.w.indent()
        return ivars

    def elementwise(self, loop: Loop) -> None:
        parallel = size_of(loop.space) >= PARALLEL_CANDIDATE and len(loop.space) > 0
        ivars = self.nested(loop.space, parallel)
        self.loop_body(loop, ivars)
        self.w.dedent(len(loop.space))

    @property
    def parallel_rows(self) -> bool:
        """Whether a row kernel's loop over rows should be a prange: work enough at N=256."""
        x = self.k.anchors[0].inputs[0]
        return size_of(x.type.shape) >= PARALLEL_CANDIDATE and x.type.rank > 0

    # -- kernel kinds -------------------------------------------------------------------------
    def print(self) -> None:
        k, w = self.k, self.w
        for n in k.nodes:
            where = " ".join(p for p in (str(n.loc) if n.loc else "", f"@{n.scope}" if n.scope else "") if p)
            w(f"# %{n.outputs[0].name} = {n.op} {', '.join('%' + v.name for v in n.inputs)}"
              + (f"  ({where})" if where else ""))
        for local, expr in k.consts.items():
            w(f"{local} = {expr}")
        for v in k.reads:  # once, outside any prange: Numba's parfors cannot index a 0-d array
            if v.type.rank == 0:
                w(f"{local_name(v)} = {arr(v)}[()]")
        if k.kind == "elementwise":
            self.elementwise(k.epilogue)
        elif k.kind == "gemm":
            self.gemm()
        elif k.kind == "reduction":
            self.reduction()
        elif k.kind == "row" and all(cpu_templates.template(a) in cpu_templates.ROW_TEMPLATES
                                     for a in k.anchors) and self._row_ok():
            self.row()
        else:
            self.whole_tensor()

    def gemm(self) -> None:
        """BLAS into the product's buffer, then the epilogue over it."""
        k, w = self.k, self.w
        mm = k.anchors[0]
        a, b = mm.inputs
        out = mm.outputs[0]
        if self.update is not None:
            u = self.update
            w(f"# SGD folded into the GEMM: {arr(u.new)} = {arr(u.param)} - lr * (op(a) @ op(b)), alpha=-lr, beta=1")
            if u.param.name not in self.in_place:
                w(f"{arr(u.new)}[...] = {arr(u.param)}")
            cpu_templates.gemm(w, mm, arr(a), arr(b), arr(u.new), alpha=f"-{local_name(u.lr)}",
                               beta=f"{CTOR[u.new.type.dtype]}(1.0)")
            return
        cpu_templates.gemm(w, mm, arr(a), arr(b), arr(out))
        if k.epilogue is not None:
            loop = k.epilogue
            ivars = self.nested(loop.space, size_of(loop.space) >= PARALLEL_CANDIDATE)
            self.loop_body(loop, ivars, {local_name(out): f"{arr(out)}{store_index(out, loop.space, ivars)}"})
            w.dedent(len(loop.space))

    def reduction(self) -> None:
        k, w = self.k, self.w
        red = k.anchors[0]
        x, y = red.inputs[0], red.outputs[0]
        axes, keepdims = red.attrs.get("axes", ()), red.attrs.get("keepdims", False)
        space = x.type.shape
        ftype = CTOR[y.type.dtype]
        lowering = get_op(red.op).lowering  # combine, identity and finish come from the op's record
        combine = lowering["combine"]
        lowest = f"{ftype}(-np.inf)" if y.type.dtype.is_float else f"{ftype}({int(np.iinfo(y.type.dtype.np).min)})"
        identity = lowest if lowering["identity"] == "lowest" else f"{ftype}({lowering['identity']})"
        count = " * ".join(_dim(space[a]) for a in axes) or "1"
        finish = (lambda acc: f"{acc} / {ftype}({count})") if lowering.get("finish") == "mean" else (lambda acc: acc)
        kept = [i for i in range(len(space)) if i not in axes]
        out_space = tuple(1 if i in axes else space[i] for i in range(len(space))) if keepdims else \
            tuple(space[i] for i in kept)
        value = self._element(x, k.prologue)
        trailing = list(axes) == list(range(len(space) - len(axes), len(space)))
        if trailing:  # one output element per outer index: reduce the trailing axes in place
            outer = [space[i] for i in kept]
            parallel = size_of(space) >= PARALLEL_CANDIDATE and len(outer) > 0
            ivars = self.nested(outer, parallel) if outer else []
            inner = [f"i{len(outer) + d}" for d in range(len(axes))]
            w("acc = " + identity)
            for d, i in zip([space[a] for a in axes], inner, strict=True):
                w(f"for {i} in range({_dim(d)}):")
                w.indent()
            value(ivars + inner)
            w("acc = " + combine.format(a="acc", b=local_name(x)))
            w.dedent(len(axes))
            out_ivars = [ivars[kept.index(i)] if i in kept else "0" for i in range(len(space))] if keepdims else ivars
            self._finish_reduction(y, out_space, out_ivars, finish("acc"))
            w.dedent(len(outer))
        else:  # accumulate in input order (cache-friendly for leading axes), serially
            w(f"acc = np.full({_shape_expr(out_space)}, {identity}, {ftype})")
            ivars = self.nested(space, False)
            value(ivars)
            oidx = [("0" if i in axes else ivars[i]) for i in range(len(space))] if keepdims else \
                [ivars[i] for i in kept]
            target = "acc[" + ", ".join(oidx) + "]" if oidx else "acc[()]"
            w(f"{target} = " + combine.format(a=target, b=local_name(x)))
            w.dedent(len(space))
            ivars = self.nested(out_space, size_of(out_space) >= PARALLEL_CANDIDATE)
            self._finish_reduction(y, out_space, ivars, finish("acc" + ("[" + ", ".join(ivars) + "]" if ivars
                                                                        else "[()]")))
            w.dedent(len(out_space))

    def _element(self, x: Value, prologue: Loop | None):
        """A function printing the code that puts element ``x[ivars]`` in local ``v_x``."""

        def emit(ivars: list[str]) -> None:
            if prologue is not None:  # once per input element, even where the anchor reads memory
                self.loop_body(prologue, ivars)
            if prologue is None or all(s.node.outputs[0] is not x for s in prologue.stmts):
                self.w(f"{local_name(x)} = {arr(x)}{_index(Access(x, tuple(range(len(ivars)))), ivars)}")

        return emit

    def _finish_reduction(self, y: Value, out_space, ivars: list[str], value: str) -> None:
        w = self.w
        w(f"{local_name(y)} = {value}")
        if self.k.epilogue is not None:
            self.loop_body(self.k.epilogue, ivars, {})
        if y in self.k.writes:
            w(f"{arr(y)}{store_index(y, out_space, ivars)} = {local_name(y)}")

    def _row_ok(self) -> bool:
        """One pass per row needs every anchor to read the same tensor along the same axis."""
        k = self.k
        x = k.anchors[0].inputs[0]
        axis = cpu_templates.row_axis(k.anchors[0])
        return all(a.inputs[0] is x and cpu_templates.row_axis(a) == axis for a in k.anchors) and \
            x.type.rank >= 1 and (k.epilogue is None or k.epilogue.space == x.type.shape)

    def row(self) -> None:
        cpu_templates.row_kernel(self)

    def whole_tensor(self) -> None:
        cpu_templates.whole_tensor_kernel(self)


def _bind_symbols(body: Writer, g) -> dict[str, str]:
    """``N = b_x.shape[0]`` for each batch symbol, from its first argument; symbol -> where from."""
    bound = {}
    for _, v in g.args:
        for axis, d in enumerate(v.type.shape):
            if isinstance(d, str) and d not in bound:
                body(f"{d} = {arr(v)}.shape[{axis}]")
                bound[d] = f"{arr(v)}.shape[{axis}]"
    return bound


def _shape_mismatches(g, bound: dict[str, str]) -> list[str]:
    """Conditions, one per argument axis, that are true where the argument's shape is wrong."""
    out = [f"{d} == 0" for d in bound]
    for _, v in g.args:
        for axis, d in enumerate(v.type.shape):
            where = f"{arr(v)}.shape[{axis}]"
            if where not in bound.values():
                out.append(f"{where} != {d}")
    return out or ["False"]


def _step_body(body: Writer, prog: KernelProgram, serial: dict[str, str], in_place: frozenset[str]) -> None:
    g = prog.graph
    returned = set(prog.buffers)
    starts, waits = collective_calls(prog, arr)
    in_flight = 0
    for i, item in enumerate(prog.schedule):
        for b in waits.get(i, []):
            body(f"_dist.wait({b})")
            in_flight -= 1
        if is_host(item):
            for line in starts.get(i, []):
                body(line)
                in_flight += 1
            continue
        if isinstance(item, Node):  # a view: reshape shares the buffer, or fills the one returned
            x, y = item.inputs[0], item.outputs[0]
            view = f"{arr(x)}.reshape({_shape_expr(y.type.shape)})"
            body(f"{arr(y)}[...] = {view}" if y in returned else f"{arr(y)} = {view}")
        else:
            call = f"({', '.join(KernelPrinter(item, Writer()).signature())})"
            if item.name in serial:
                body(f"if {serial[item.name]} >= {PARALLEL_ELEMENTS}:")
                body(f"    {item.name}{call}")
                body("else:")
                body(f"    {item.name}_serial{call}")
            else:
                body(f"{item.name}{call}")
            if in_flight:  # MPI progresses a non-blocking all-reduce only inside MPI calls
                body("_dist.progress()")
    if starts:
        body("_dist.finish()")
    for old, new in g.updates:
        if new is not old and old.name not in in_place:
            body(f"{arr(old)}[...] = {arr(new)}")


def _shape_expr(shape) -> str:
    return "(" + "".join(f"{_dim(d)}, " for d in shape) + ")"


def work_expr(k: Kernel) -> str:
    """The element count of a kernel's largest loop, as an expression of its symbols."""
    spaces = [lp.space for lp in (k.prologue, k.epilogue) if lp is not None]
    spaces += [a.inputs[0].type.shape for a in k.anchors if a.inputs] + [v.type.shape for v in k.writes]
    biggest = max(spaces, key=size_of, default=())
    return " * ".join(_dim(d) for d in biggest) or "1"


HEADER = '''"""Generated by gradfuse from @{name}; do not edit: {what}."""
import math

import numpy as np
from numba import njit, prange
{imports}
f32, f64, i32, i64, b1 = np.float32, np.float64, np.int32, np.int64, np.bool_
'''


def print_module(prog: KernelProgram, fastmath: bool = True, in_place: frozenset[str] = frozenset()) -> str:
    """The whole program as Python source: the kernels, a Python ``step`` calling them in order
    (a dispatch per kernel, but nothing compiled twice: Numba links every kernel into a jitted
    caller and compiles it all again), and ``checked_step``, which small programs compile for
    one dispatch per call. ``in_place`` names the updated arguments whose new value the runtime
    has the kernels write straight into the argument (the memory plan): those need no copy."""
    g = prog.graph
    flags = FASTMATH if fastmath else False  # the helpers' (inlined into each kernel, which sets its own)
    body = Writer()
    serial: dict[str, str] = {}  # parallel kernel -> the element count that decides, at run time
    for k in prog.kernels:
        if is_host(k):  # no kernel: the step calls the runtime (codegen/collectives.py)
            continue
        kflags = fastmath_flags(k) if fastmath else False
        kernel = Writer()
        kernel.indent()
        kp = KernelPrinter(k, kernel, prog, in_place)
        kp.print()
        # parallel=True only where a prange was printed: it costs ~0.7 s of compile per kernel
        parallel = any("prange(" in line for line in kernel.lines)
        body(f"@njit(cache=True, fastmath={kflags}, parallel={parallel}, nogil=True, {NUMPY_ERRORS})")
        body(f"def {k.name}({', '.join(kp.signature())}):")
        body.lines += kernel.lines
        body("    return")
        body()
        if parallel:  # a serial twin for small batches: a parallel launch costs tens of microseconds
            serial[k.name] = work_expr(k)
            body(f"@njit(cache=True, fastmath={kflags}, parallel=False, nogil=True, {NUMPY_ERRORS})")
            body(f"def {k.name}_serial({', '.join(kp.signature())}):")
            body.lines += [line.replace("prange(", "range(") for line in kernel.lines]
            body("    return")
            body()
    # the step function: every kernel, in order; and the same behind shape checks, for the runtime
    # to compile with Numba under an explicit signature (one dispatch per call: see Program)
    args = [arr(v) for _, v in g.args]
    bufs = [arr(v) for v in prog.buffers]
    body(f"def step({', '.join(args + bufs)}):")
    body.indent()
    bound = _bind_symbols(body, g)
    _step_body(body, prog, serial, in_place)
    body("return")
    body.dedent()
    body()
    body(f"def checked_step({', '.join(args + bufs)}):")
    body.indent()
    body('"""step(...) if every argument has its shape (1 if not: the caller says what is wrong)."""')
    bound = _bind_symbols(body, g)
    checks = _shape_mismatches(g, bound)
    body(f"if ({checks[0]}" + "".join(f"\n{'    ' * (body.depth + 2)}or {c}" for c in checks[1:]) + "):")
    body("    return 1")
    _step_body(body, prog, serial, in_place)
    body("return 0")
    body.dedent()
    code = "\n".join(body.lines)
    helpers = [helper_source(name, ftype, f"@njit(cache=True, fastmath={flags}, inline='always', {NUMPY_ERRORS})")
               for name, ftype in ordered_helpers(helpers_used(code))]
    imports = ("\nfrom gradfuse.codegen.blas import gemm as blas_gemm, require as require_blas\n\n"
               f"require_blas()  # codegen/blas.py {blas.SOURCE_HASH}\n") if "blas_gemm(" in code else ""
    if "_dist." in code:
        imports += "from gradfuse.runtime import distributed as _dist\n"
    header = HEADER.format(name=g.name, what="one training/inference step as Numba kernels", imports=imports)
    return header + "\n\n" + "\n\n".join(helpers) + ("\n\n" if helpers else "") + code + "\n"


class CPUBackend:
    """What the runtime drives: print a kernel program as a module, load it, name each kernel's
    arguments; ``target`` holds what the passes plan for (the GEMM's capabilities)."""

    target = TARGET
    name = TARGET.name

    @staticmethod
    def missing_lowering(op: OpDef) -> str | None:
        return missing_lowering(op)

    @staticmethod
    def print_module(prog: KernelProgram, in_place: frozenset[str] = frozenset()) -> str:
        return print_module(prog, in_place=in_place)

    @staticmethod
    def load(source: str, cache_dir: str, stem: str):
        """(the imported module, its path): ``source`` written to ``cache_dir/gf_stem_HASH.py``
        once and imported under a stable name, so Numba's on-disk cache (``cache=True``) finds
        its compiled kernels next time."""
        name = f"gf_{stem}_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
        path = os.path.join(cache_dir, f"{name}.py")
        if not os.path.exists(path):
            with atomic_file(path, CACHE, "w") as f:  # a concurrent reader sees all of it or nothing
                f.write(source)
        return CPUBackend.import_file(path), path

    @staticmethod
    def import_file(path: str):
        """Import a generated module under a name derived from its file (stable across processes)."""
        module_name = "gradfuse_kernels." + os.path.splitext(os.path.basename(path))[0]
        loaded = sys.modules.get(module_name)
        if loaded is not None and os.path.abspath(loaded.__file__) == os.path.abspath(path):
            return loaded
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module

    @staticmethod
    def compile_entry(module, args: list[Value], buffers: list[Value]):
        """``module.checked_step`` compiled under its exact signature (cached beside the kernels),
        for one dispatch per call; None where Numba cannot."""
        from numba import from_dtype, njit, types

        def array(v):
            return types.Array(from_dtype(v.type.dtype.np), v.type.rank, "C")

        signature = types.int64(*(array(v) for v in args), *(array(v) for v in buffers))
        try:
            return njit(signature, cache=True, nogil=True)(module.checked_step)
        except Exception:  # noqa: BLE001 - the Python path still works; never fail a run for this
            return None

    @staticmethod
    def argument(v: Value) -> str:
        """The parameter name of buffer ``v`` in a kernel's and the step's signature."""
        return arr(v)

    @staticmethod
    def kernel_arguments(k: Kernel) -> list[str]:
        """The parameters of kernel ``k``, in order: its buffers, then the batch symbols."""
        return KernelPrinter(k, Writer()).signature()

    @staticmethod
    def unwritten(k: Kernel, prog: KernelProgram) -> Value | None:
        """A value ``k`` computes but never writes (a gradient the GEMM folds its update into)."""
        folded = update_in_gemm(k, prog)
        return folded.product if folded else None


BACKEND = CPUBackend()
