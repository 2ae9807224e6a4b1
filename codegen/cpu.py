"""The Numba CPU backend: prints a kernel program as one Python module of ``@njit`` functions.

Each kernel becomes a function; a generated ``step`` function calls them in schedule order, so
running a whole program costs one dispatch from Python (the CPU analogue of a CUDA graph). The
module is written to disk and imported under a stable name, so Numba's on-disk cache works.

Kernel shapes:
- elementwise: nested loops over the output space;
- gemm: CBLAS (numpy's OpenBLAS, :mod:`codegen.blas`) into a buffer, then the epilogue loop; an
  SGD update of the weight whose gradient it makes folds into the GEMM (alpha, beta);
- reduction: per output element over trailing axes (rows), or accumulating into an array in
  input order (leading axes, e.g. bias gradients), with prologue and epilogue;
- row: per row for softmax, log_softmax, layer_norm and cross-entropy: the prologue makes the row
  (accumulating its max or sum on the way) into the output row or a row buffer, then the op and
  the epilogue; other structured and layout ops use whole-tensor templates.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import os
import re
import sys
from dataclasses import dataclass

from gradfuse.files import CACHE, atomic_file
from gradfuse.ir.graph import Node, Value
from gradfuse.ir.registry import OpDef, get_op, role

from . import blas
from .collectives import collective_calls, is_host
from .kernel_ir import CTOR, Kernel, KernelProgram, local_name
from .loop_nests import SUM, For, Gemm, Let, Load, Scratch, Store, count, ix_text, kernel_body, missing_nest, size_of
from .scalar_lib import helper_source, helpers_used, ordered_helpers
from .targets import TARGETS

TARGET = TARGETS["cpu"]

# The kernels are serial (the GEMMs use OpenBLAS's threads), but a kernel without a GEMM whose
# loops are large at the nominal batch (PARALLEL_CANDIDATE elements) gets a parallel twin, its
# outer loops a prange, which the step calls where the kernel's largest array has
# PARALLEL_ELEMENTS or more. Numba compiles a twin (~1 s: parfors) on its first call only, so
# programs that never run that large never pay for it. Beside BLAS calls, whose threads spin
# after returning, parallel epilogues measured slower (MLP step 6.5 vs 5.9 ms): GEMM kernels stay
# serial; GELU + LayerNorm over 4096x1024 (no GEMM) measured a third slower serial.
PARALLEL_CANDIDATE = 1 << 16
PARALLEL_ELEMENTS = 1 << 21
# x / 0 gives inf or nan as in numpy (the reference), not Python's ZeroDivisionError, whose check
# is a branch in every division of every loop
NUMPY_ERRORS = "error_model='numpy'"
# fast-math without 'nnan' and 'ninf' (with them LLVM folded x / (s - s) to a finite number), and
# without 'reassoc' in the kernels: it rewrites arithmetic, x + (x - x) became x and (x + m) - x
# became m (inf where numpy's inf - inf gives NaN). Sums vectorise with it, so each accumulation
# goes through ``accumulate_F``, a function compiled with 'reassoc' that Numba does not inline
# (LLVM does, and its fadd keeps the flag): a 4M-element sum took 0.238 ms so, 0.221 with
# 'reassoc' throughout, 3.4 without any. Helpers are inlined by Numba and take the kernel's flags.
FASTMATH = "{'contract', 'arcp', 'nsz'}"
ACCUMULATE = """@njit(cache=True, fastmath={{'reassoc', 'contract', 'arcp', 'nsz'}}, nogil=True, {errors})
def accumulate_{F}(acc, x):
    return acc + x
"""


def missing_lowering(op: OpDef) -> str | None:
    """Why this backend cannot print ``op``, from its record alone; None when it can: every loop
    nest prints, and of the named structured ops the CPU has the GEMM."""
    why = missing_nest(op)
    if why is None and op.role == "gemm" and op.lowering.get("template") != "gemm":
        return "a GEMM without the 'gemm' template"
    return why


def arr(v: Value) -> str:
    """The array parameter holding buffer ``v``."""
    return "b_" + local_name(v)[2:]


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
    if (role(mm) != "gemm" or get_op(mul.op).lowering.get("gemm_update") != "scale"
            or get_op(sub.op).lowering.get("gemm_update") != "minus" or g.type.rank != 2):
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
    """Prints one kernel's loop nests (:mod:`codegen.loop_nests`) as the body of an ``@njit``
    function."""

    def __init__(self, k: Kernel, w: Writer, prog: KernelProgram | None = None,
                 in_place: frozenset[str] = frozenset()):
        self.k, self.w = k, w
        self.update = update_in_gemm(k, prog) if prog is not None else None
        self.in_place = in_place
        self.params = [arr(v) for v in dict.fromkeys(k.reads + k.writes)]
        self.symbols = k.symbols

    def signature(self) -> list[str]:
        return self.params + self.symbols

    @functools.cached_property
    def body(self) -> list:
        body = kernel_body(self.k)
        if self.update is not None:  # the whole kernel is one GEMM that also updates the weight
            body = [s for s in body if not isinstance(s, For | Gemm)] + [self.update]
        return body

    def print(self, parallel: bool = False) -> None:
        """The kernel's statements into ``self.w``; with ``parallel``, the outer loops of the nests
        :func:`parallel_loops` picks as pranges (the parallel twin)."""
        k, w = self.k, self.w
        for n in k.nodes:
            where = " ".join(p for p in (str(n.loc) if n.loc else "", f"@{n.scope}" if n.scope else "") if p)
            w(f"# %{n.outputs[0].name} = {n.op} {', '.join('%' + v.name for v in n.inputs)}"
              + (f"  ({where})" if where else ""))
        body = self.body
        parallel = parallel_loops(body) if parallel else []
        for s in body:
            if isinstance(s, For):
                self.loop(s, parallel=s in parallel)
            else:
                self.stmt(s)

    def stmts(self, body: list) -> None:
        for s in body:
            self.stmt(s)

    def stmt(self, s) -> None:
        w = self.w
        if isinstance(s, Let):
            w(f"{s.local} = {s.expr}")
        elif isinstance(s, Load):  # a buffer in a written one's storage by that one's name: one array to LLVM
            buf = self.k.same_storage.get(s.buf, s.buf) if isinstance(s.buf, Value) else s.buf
            w(f"{s.local} = {_buf(buf)}{_index(s.index)}")
        elif isinstance(s, Store):
            w(f"{_buf(s.buf)}{_index(s.index)} {'+=' if s.add else '='} {s.local}")
        elif isinstance(s, Scratch):
            shape = "(" + "".join(f"{d}, " for d in s.shape) + ")"
            w(f"{s.name} = np.empty({shape}, {CTOR[s.dtype]})" if s.fill is None else
              f"{s.name} = np.full({shape}, {s.fill}, {CTOR[s.dtype]})")
        elif isinstance(s, For):
            self.loop(s)
        elif isinstance(s, Gemm):
            mm = s.node
            gemm_call(w, mm, arr(mm.inputs[0]), arr(mm.inputs[1]), arr(mm.outputs[0]))
        elif isinstance(s, UpdateInGemm):
            mm = self.k.anchors[0]
            w(f"# SGD folded into the GEMM: {arr(s.new)} = {arr(s.param)} - lr * (op(a) @ op(b)), alpha=-lr, beta=1")
            if s.param.name not in self.in_place:  # a loop: `a[...] = b` compiles Numba's error message (~5 s)
                ivars = [f"c{d}" for d in range(s.new.type.rank)]
                for d, i in zip(s.new.type.shape, ivars, strict=True):
                    w(f"for {i} in range({d}):")
                    w.indent()
                w(f"{arr(s.new)}[{', '.join(ivars)}] = {arr(s.param)}[{', '.join(ivars)}]")
                w.dedent(len(ivars))
            gemm_call(w, mm, arr(mm.inputs[0]), arr(mm.inputs[1]), arr(s.new), alpha=f"-{local_name(s.lr)}",
                      beta=f"{CTOR[s.new.type.dtype]}(1.0)")
        else:
            raise AssertionError(s)

    def loop(self, f: For, parallel: bool = False) -> None:
        w = self.w
        for r in f.reductions:
            w(f"{r.acc} = {r.identity}")
        for d, (v, e) in enumerate(zip(f.vars, f.extents, strict=True)):
            w(f"for {v} in {'prange' if parallel and d == 0 else 'range'}({e}):")
            w.indent()
        self.stmts(f.body)
        for r in f.reductions:
            if r.combine == SUM and r.ctor not in ("f32", "f64"):
                w(f"{r.acc} += {r.operand}")
            elif r.combine == SUM:
                w(f"{r.acc} = accumulate_{r.ctor}({r.acc}, {r.operand})")
            else:
                w(f"{r.acc} = {r.combine.format(a=r.acc, b=r.operand)}")
        w.dedent(len(f.vars))


def parallel_loops(body: list) -> list[For]:
    """The top-level nests of a kernel body worth a prange: independent iterations without a
    reduction over them, PARALLEL_CANDIDATE elements at the nominal batch; none beside a GEMM."""
    if any(isinstance(s, Gemm | UpdateInGemm) for s in body):
        return []
    return [s for s in body if isinstance(s, For) and s.vars and s.independent and not s.reductions
            and s.work >= PARALLEL_CANDIDATE]


def _largest(k: Kernel) -> Value:
    """The array of ``k`` with the most elements at the nominal batch: its size decides, at run
    time, whether the parallel twin runs."""
    return max(dict.fromkeys(k.reads + k.writes), key=lambda v: size_of(v.type.shape))


def _buf(b) -> str:
    return arr(b) if isinstance(b, Value) else b


def _index(index) -> str:
    return "[" + ", ".join(map(ix_text, index)) + "]" if index else "[()]"


# ---- GEMM ----------------------------------------------------------------------------------------
def gemm_call(w, mm: Node, a: str, b: str, dest: str, alpha: str | None = None, beta: str | None = None) -> None:
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
        w(call(f"{a}.reshape(({count(at.shape[:-1])}, {k}))", b,
               f"{dest}.reshape(({count(out.shape[:-1])}, {out.shape[-1]}))"))
        return
    batch = out.shape[:-2]
    ivars = [f"g{i}" for i in range(len(batch))]
    for d, i in zip(batch, ivars, strict=True):
        w(f"for {i} in range({d}):")
        w.indent()

    def pick(name: str, t) -> str:
        lead = t.rank - 2
        idx = [("0" if t.shape[j] == 1 and batch[len(batch) - lead + j] != 1 else ivars[len(batch) - lead + j])
               for j in range(lead)]
        return f"{name}[{', '.join(idx)}]" if idx else name

    w(call(pick(a, at), pick(b, bt), f"{dest}[{', '.join(ivars)}]"))
    w.dedent(len(batch))


def _bind_symbols(body: Writer, g) -> dict[str, str]:
    """``N = b_x.shape[0]`` for each batch symbol, from its first argument; symbol -> where from."""
    bound = {}
    for _, v in g.args:
        for axis, d in enumerate(v.type.shape):
            if isinstance(d, str) and "*" not in d and d not in bound:  # a product (N*32) binds nothing
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


def _step_body(body: Writer, prog: KernelProgram, calls: dict[str, str], in_place: frozenset[str]) -> None:
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
            for line in calls[item.name].split("\n"):
                body(line)
            if in_flight:  # MPI progresses a non-blocking all-reduce only inside MPI calls
                body("_dist.progress()")
    if starts:
        body("_dist.finish()")
    for old, new in g.updates:
        if new is not old and old.name not in in_place:
            body(f"{arr(old)}[...] = {arr(new)}")


def _shape_expr(shape) -> str:
    return "(" + "".join(f"{_dim(d)}, " for d in shape) + ")"


_NAMED = re.compile(r"\b[bvlt]_[A-Za-z0-9_]+")  # names made from value names: buffers, locals, loads, scratch
# a number in generated code: floats (kept) first, then integers (which may become arguments)
_NUMBER = re.compile(r"(?<![\w.])(\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|0[xX][0-9a-fA-F]+|\d+)(?![\w.])")


def _is_int(token: str) -> bool:
    return token.isdigit() or token[:2] in ("0x", "0X")


def _code_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.strip().startswith("#")]


def integer_literals(lines: list[str]) -> list[int]:
    """Every integer literal of a kernel's code (comments left out), in order: its extents,
    offsets and constants (a dropout's stream), which may become arguments of shared code."""
    return [int(m.group(0), 0) for line in _code_lines(lines) for m in _NUMBER.finditer(line) if _is_int(m.group(0))]


def with_arguments(lines: list[str], names: dict[int, str]) -> list[str]:
    """``lines`` with the integer literals at the positions of ``names`` (as counted by
    :func:`integer_literals`) replaced by those names."""
    at = itertools.count()
    out = []
    for line in lines:
        if line.strip().startswith("#"):
            out.append(line)
            continue
        out.append(_NUMBER.sub(lambda m: names.get(next(at), m.group(0)) if _is_int(m.group(0)) else m.group(0), line))
    return out


def canonical_kernel(signature: list[str], lines: list[str], integers_as_arguments: bool = True) -> str:
    """A kernel's code with the names made from its values renamed in order (the parameters by
    position), its integer literals as ``#`` and comments dropped: kernels with the same canonical
    code compute the same function of their arguments and their integers (identical layers,
    layers of other widths, dropouts of other streams), so one compiled function serves them all,
    taking as arguments the integers that differ. ``integers_as_arguments=False`` keeps them, for
    a backend that compiles its widths in (codegen/cuda.py)."""
    names = {p: f"arg{i}" for i, p in enumerate(signature)}

    def rename(m) -> str:
        return names.setdefault(m.group(0), f"loc{len(names)}")

    code = [_NUMBER.sub(lambda m: "#" if integers_as_arguments and _is_int(m.group(0)) else m.group(0),
                        _NAMED.sub(rename, line)) for line in _code_lines(lines)]
    return ", ".join(_NAMED.sub(rename, p) for p in signature) + "\n" + "\n".join(code)


def kernel_counts(source: str) -> tuple[int, int]:
    """(kernels compiled, kernels reusing another's code) in a module :func:`print_module` wrote;
    parallel twins not counted (compiled only where a run is that large)."""
    return (len(re.findall(r"^def k\w*(?<!_parallel)\(", source, re.M)),
            len(re.findall(r"^# k\w+: the code of ", source, re.M)))


@dataclass
class SharedCode:
    """A kernel function other kernels may call: where it is, which of its code's integer literals
    are arguments (``varying``, positions as :func:`integer_literals` counts them) and its own
    integers (the others fixed in its code)."""
    module: str | None  # the file of the module defining it (None: the module being printed)
    function: str
    varying: tuple[int, ...]
    literals: tuple[int, ...]

    def serves(self, literals: list[int]) -> bool:
        fixed = set(range(len(self.literals))) - set(self.varying)
        return len(literals) == len(self.literals) and all(literals[i] == self.literals[i] for i in fixed)


HEADER = """\"\"\"Generated by gradfuse from @{name}; do not edit: {what}.\"\"\"
import math

import numpy as np
from numba import njit, prange
{imports}
f32, f64, i32, i64, b1 = np.float32, np.float64, np.int32, np.int64, np.bool_
"""


def print_module(prog: KernelProgram, in_place: frozenset[str] = frozenset(),
                 shared: dict[str, SharedCode] | None = None) -> str:
    """The whole program as Python source: the kernels, a Python ``step`` calling them in order
    (a dispatch per kernel, but nothing compiled twice: Numba links every kernel into a jitted
    caller and compiles it all again), and ``checked_step``, which small programs compile for
    one dispatch per call. ``in_place`` names the updated arguments whose new value the runtime
    has the kernels write straight into the argument (the memory plan): those need no copy.

    Kernels with the same canonical code (:func:`canonical_kernel`) share one function, which
    takes the integers that differ between them as trailing arguments (``LITERALS`` has each
    kernel's); ``shared`` holds the functions of modules printed before (the predict program's,
    for the training step's), and gets this module's added (``module`` None)."""
    g = prog.graph
    kflags = FASTMATH  # the kernels' and the helpers' (which Numba inlines)
    shared = {} if shared is None else shared
    printed = []  # (kernel, printer, lines, canonical code, integer literals)
    parallel: dict[str, list[str]] = {}  # kernel -> its parallel twin's lines (see PARALLEL_ELEMENTS)
    for k in prog.kernels:
        if is_host(k):  # no kernel: the step calls the runtime (codegen/collectives.py)
            continue
        kernel = Writer()
        kernel.indent()
        kp = KernelPrinter(k, kernel, prog, in_place)
        kp.print()
        if parallel_loops(kp.body):
            kp.w = Writer()
            kp.w.indent()
            kp.print(parallel=True)
            parallel[k.name], kp.w = kp.w.lines, kernel
        code = canonical_kernel(kp.signature(), kernel.lines) + ("\n# a parallel twin" if k.name in parallel else "")
        printed.append((k, kp, kernel.lines, code, integer_literals(kernel.lines)))
    # the integers that differ between the kernels of one code in this module become arguments
    varying: dict[str, set[int]] = {}
    for _, _, _, code, lits in printed:
        first = next(p[4] for p in printed if p[3] == code)
        varying.setdefault(code, set()).update(i for i, (a, b) in enumerate(zip(first, lits, strict=True)) if a != b)
    body = Writer()
    calls: dict[str, str] = {}  # kernel -> its call in the step
    literals: dict[str, tuple[int, ...]] = {}  # kernel -> the integers its function takes
    siblings: dict[str, str] = {}  # module file -> its name here
    for k, kp, lines, code, lits in printed:
        use = shared.get(code)
        if use is not None and not use.serves(lits):
            use = None  # the same code with other integers where that function has them fixed
        if use is None:  # the first of its code: define the function
            use = shared[code] = SharedCode(None, k.name, tuple(sorted(varying[code])), tuple(lits))
            names = {i: f"lit{j}" for j, i in enumerate(use.varying)}
            body(f"@njit(cache=True, fastmath={kflags}, nogil=True, {NUMPY_ERRORS})")
            body(f"def {k.name}({', '.join(kp.signature() + list(names.values()))}):")
            body.lines += with_arguments(lines, names)
            body("    return")
            body()
            if k.name in parallel:
                body(f"@njit(cache=True, fastmath={kflags}, nogil=True, parallel=True, {NUMPY_ERRORS})")
                body(f"def {k.name}_parallel({', '.join(kp.signature() + list(names.values()))}):")
                body.lines += with_arguments(parallel[k.name], names)
                body("    return")
                body()
        else:  # the same code up to names and integers as an earlier kernel (another layer): compiled once
            where = use.function
            if use.module is not None:
                where = f"{siblings.setdefault(use.module, f'_module{len(siblings)}')}.{use.function}"
            body(f"# {k.name}: the code of {where} on its own buffers")
            body.lines += [line.strip().replace("# %", "#   %", 1) for line in lines if line.strip().startswith("# %")]
            body(f"{k.name} = {where}")
            if k.name in parallel:
                body(f"{k.name}_parallel = {where}_parallel")
            body()
        literals[k.name] = tuple(lits[i] for i in use.varying)
        call = f"({', '.join(kp.signature() + [str(x) for x in literals[k.name]])})"
        calls[k.name] = k.name + call
        if k.name in parallel:
            calls[k.name] = (f"if {arr(_largest(k))}.size >= {PARALLEL_ELEMENTS}:\n    {k.name}_parallel{call}\n"
                             f"else:\n    {calls[k.name]}")
    body("LITERALS = {" + ", ".join(f"{name!r}: {lits!r}" for name, lits in literals.items() if lits) + "}"
         "  # the integer arguments of kernels calling shared code")
    body()
    # the step function: every kernel, in order; and the same behind shape checks, for the runtime
    # to compile with Numba under an explicit signature (one dispatch per call: see Program)
    args = [arr(v) for _, v in g.args]
    bufs = [arr(v) for v in prog.buffers]
    body(f"def step({', '.join(args + bufs)}):")
    body.indent()
    bound = _bind_symbols(body, g)
    _step_body(body, prog, calls, in_place)
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
    _step_body(body, prog, calls, in_place)
    body("return 0")
    body.dedent()
    code = "\n".join(body.lines)
    helpers = [helper_source(name, ftype, f"@njit(cache=True, fastmath={kflags}, inline='always', {NUMPY_ERRORS})")
               for name, ftype in ordered_helpers(helpers_used(code))]
    helpers += [ACCUMULATE.format(F=F, errors=NUMPY_ERRORS) for F in ("f32", "f64") if f"accumulate_{F}(" in code]
    imports = ("\nfrom gradfuse.codegen.blas import gemm as blas_gemm, require as require_blas\n\n"
               f"require_blas()  # codegen/blas.py {blas.SOURCE_HASH}\n") if "blas_gemm(" in code else ""
    if "_dist." in code:
        imports += "from gradfuse.runtime import distributed as _dist\n"
    if siblings:  # kernels of a module printed before (the predict program's), loaded from beside this one
        imports += "\nfrom gradfuse.codegen.cpu import import_sibling\n\n" + "".join(
            f"{name} = import_sibling(__file__, {module!r})\n" for module, name in siblings.items())
    header = HEADER.format(name=g.name, what="one training/inference step as Numba kernels", imports=imports)
    return header + "\n\n" + "\n\n".join(helpers) + ("\n\n" if helpers else "") + code + "\n"


def import_sibling(here: str, file: str):
    """The generated module ``file`` in the folder of the module at ``here`` (the cache folder,
    or an artifact's kernels/), imported once under its stable name."""
    return CPUBackend.import_file(os.path.join(os.path.dirname(os.path.abspath(here)), file))


class CPUBackend:
    """What the runtime drives: print a kernel program as a module, load it, name each kernel's
    arguments; ``target`` holds what the passes plan for (the GEMM's capabilities)."""

    target = TARGET
    name = TARGET.name

    @staticmethod
    def missing_lowering(op: OpDef) -> str | None:
        return missing_lowering(op)

    @staticmethod
    def print_module(prog: KernelProgram, in_place: frozenset[str] = frozenset(),
                     shared: dict[str, SharedCode] | None = None) -> str:
        return print_module(prog, in_place=in_place, shared=shared)

    @staticmethod
    def kernel_counts(source: str) -> tuple[int, int]:
        return kernel_counts(source)

    @staticmethod
    def empty(shape: tuple, dtype):
        """Storage for the memory plan's arena and the buffers outside it."""
        import numpy as np

        return np.empty(shape, dtype)

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
