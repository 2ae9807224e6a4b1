"""The Numba CUDA backend: the same loop nests as the CPU (:mod:`codegen.loop_nests`), printed as
``@cuda.jit`` kernels and a Python ``step`` that launches them in order on one stream.

A kernel of the kernel IR becomes one launch per top-level loop nest (a *phase*): the loops of
one nest may run in parallel, the nests after it read what it wrote. Each phase maps its nest:

- a loop with no inner loop: one thread per iteration, in a grid-stride loop over the flattened
  iteration space (elementwise work, layout ops, optimizer updates);
- a loop with inner loops (rows of a softmax, of a norm, a reduction per output element): one
  block per iteration; the inner loops stride over the block's threads and their reductions are
  block reductions (a shared-memory tree: the simulator has no warp shuffles), whose result every
  thread reads; per-row scratch lives in shared memory; loops nested deeper run per thread;
- a loop with reductions of its own (a loss over the rows, a total): one block, whose threads
  accumulate and reduce, then thread 0 runs the statements after the loop;
- a loop whose iterations are not independent: accumulating stores become atomic adds; one that
  reads back what it overwrites (a max over leading axes) runs in one thread;
- ``Gemm``: a register-tiled shared-memory GEMM kernel (the epilogue is the next phase).

0-d buffers travel as 1-element arrays. The runtime half (device arrays, copies) is
:class:`CUDABackend`'s ``call``.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from gradfuse.files import CACHE, atomic_file
from gradfuse.ir.graph import Node, Value
from gradfuse.ir.registry import OpDef

from .collectives import is_host
from .cpu import Writer, arr, canonical_kernel
from .cuda_gemm import GPU_TILES, SIM_TILES, CublasGemm, GemmTiles
from .kernel_ir import CTOR, CodegenError, Kernel, KernelProgram
from .loop_nests import SUM, For, Gemm, Let, Load, Scratch, Store, count, ix_text, kernel_body, missing_nest, walk
from .scalar_lib import helper_source, helpers_used, ordered_helpers
from .targets import TARGETS

loop_count = count

MAX_BLOCKS = 1024
SHUFFLED = {"f32", "f64", "i32", "i64"}  # the types cuda.shfl_*_sync moves (not bool)


def missing_lowering(op: OpDef) -> str | None:
    """Why this backend cannot print ``op``: every loop nest prints, and the GEMM is its own."""
    why = missing_nest(op)
    if why is None and op.role == "gemm" and op.lowering.get("template") != "gemm":
        return "a GEMM without the 'gemm' template"
    return why


@dataclass
class Phase:
    """One launch: ``nest`` (a For, a Gemm, or None for statements in one thread) with the
    kernel-level statements before it (constants, 0-d reads) and, for a reducing nest, the
    statements after it that read its result (run by thread 0)."""

    nest: For | Gemm | None
    preamble: list
    tail: list = field(default_factory=list)


def phases(body: list) -> list[Phase]:
    """The kernel body's top-level nests, each with what it needs before it and (a reducing nest)
    after it: a statement that reads a reduction's result, or another such statement's, is the
    nest's tail (thread 0, same launch); other scalar statements are repeated in every later
    phase; other stores at the top run alone in one thread."""
    out: list[Phase] = []
    preamble: list = []
    loose: list = []
    after: set[str] = set()  # the names a reducing nest's tail defines or reads
    for s in body:
        if isinstance(s, For | Gemm):
            if loose:
                out.append(Phase(None, list(preamble), loose))
                loose = []
            out.append(Phase(s, list(preamble)))
            after = {r.acc for r in s.reductions} if isinstance(s, For) else set()
        elif isinstance(s, Scratch):
            continue  # a kernel argument the step allocates (and fills)
        elif after and _reads(s, after):
            out[-1].tail.append(s)
            if isinstance(s, Let | Load):
                after.add(s.local)
        elif isinstance(s, Let | Load) and not (isinstance(s, Load) and s.index):
            preamble.append(s)
        else:
            loose.append(s)
    if loose:
        out.append(Phase(None, list(preamble), loose))
    return out


def _reads(s, names: set[str]) -> bool:
    """Whether statement ``s`` (or a statement inside it) reads one of ``names``."""
    text = " ".join(t for x in walk([s]) for t in (
        [x.expr] if isinstance(x, Let) else [x.local] if isinstance(x, Store) else
        [ix_text(i) for i in x.index] if isinstance(x, Load) else []))
    return any(re.search(rf"\b{n}\b", text) for n in names)


def _buf(b) -> str:
    return arr(b) if isinstance(b, Value) else b


def _index(index) -> str:
    return "[" + ", ".join(map(ix_text, index)) + "]" if index else "[0]"


class CudaKernelPrinter:
    """Prints kernel ``k``'s phases as ``@cuda.jit`` functions and the launches of them."""

    def __init__(self, k: Kernel, block: int, tiles: GemmTiles | None = None, max_blocks: int = 1024,
                 warp: int = 0):
        self.k, self.block, self.tiles, self.max_blocks = k, block, tiles or GPU_TILES, max_blocks
        self.warp = warp  # lanes per warp for shuffle reductions; 0: shared-memory trees only (the simulator)
        body = kernel_body(k)
        self.scratch = [s for s in body if isinstance(s, Scratch)]  # top-level: device arrays
        self.phases = phases(body)
        self.params = [arr(v) for v in dict.fromkeys(k.reads + k.writes)] + [s.name for s in self.scratch]
        self.symbols = k.symbols

    def signature(self) -> list[str]:
        return self.params + self.symbols

    # -- launches (in the Python step) ---------------------------------------------------------
    def launches(self, w: Writer) -> None:
        args = ", ".join(self.signature())
        for s in self.scratch:
            shape = "(" + "".join(f"{d}, " for d in s.shape) + ")" if s.shape else "(1,)"
            w(f"{s.name} = cuda.device_array({shape}, np.{np.dtype(s.dtype.np).name})")
            if s.fill is not None:
                w(f"fill[{self.max_blocks}, {self.block}]({s.name}.reshape(-1), {s.fill})")
        for i, ph in enumerate(self.phases):
            name = f"{self.k.name}_{i}"
            lets = {s.local: s.expr for s in ph.preamble if isinstance(s, Let) and s.node is None}

            def count(extents, lets=lets):  # in the step: the kernel's shape names (R, C) spelled out
                text = loop_count(extents)
                for local, expr in lets.items():
                    text = re.sub(rf"\b{local}\b", f"({expr})", text)
                return text
            if isinstance(ph.nest, Gemm):
                self.gemm_launch(w, ph.nest.node)
            elif ph.nest is None or ph.nest.reductions or self._serial(ph.nest):
                w(f"{name}[1, {1 if ph.nest is None or self._serial(ph.nest) else self.block}]({args})")
            elif self._rows(ph.nest):
                w(f"{name}[max(1, min({count(ph.nest.extents)}, {self.max_blocks})), {self.block}]({args})")
            else:
                w(f"{name}[max(1, min(({count(ph.nest.extents)} + {self.block - 1}) // {self.block}, "
                  f"{self.max_blocks})), {self.block}]({args})")

    def gemm_launch(self, w: Writer, mm: Node) -> None:
        """The tiled GEMM over 2-D views: batch axes loop here, or fold into rows when only the
        left operand has them."""
        ta, tb = int(mm.attrs["transpose_a"]), int(mm.attrs["transpose_b"])
        a, b, c = (arr(v) for v in (*mm.inputs, mm.outputs[0]))
        at, bt, out = mm.inputs[0].type, mm.inputs[1].type, mm.outputs[0].type
        F = CTOR[out.dtype]

        def call(x, y, z, m, n, kk):
            t, side = self.tiles.tile, self.tiles.threads
            grid = f"((({n}) + {t - 1}) // {t}, (({m}) + {t - 1}) // {t})"
            w(f"gemm_{F}[{grid}, ({side}, {side})]({x}, {y}, {z}, {m}, {n}, {kk}, {ta}, {tb})")

        kdim = at.shape[-2] if ta else at.shape[-1]
        if at.rank == 2 and bt.rank == 2:
            call(a, b, c, out.shape[0], out.shape[1], kdim)
            return
        if bt.rank == 2 and not ta:
            rows = count(at.shape[:-1])
            call(f"{a}.reshape(({rows}, {at.shape[-1]}))", b, f"{c}.reshape(({rows}, {out.shape[-1]}))",
                 rows, out.shape[-1], kdim)
            return
        batch = out.shape[:-2]
        ivars = [f"g{i}" for i in range(len(batch))]
        for d, i in zip(batch, ivars, strict=True):
            w(f"for {i} in range({d}):")
            w.indent()

        def pick(name, t):
            lead = t.rank - 2
            idx = [("0" if t.shape[j] == 1 and batch[len(batch) - lead + j] != 1 else ivars[len(batch) - lead + j])
                   for j in range(lead)]
            return f"{name}[{', '.join(idx)}]" if idx else name

        call(pick(a, at), pick(b, bt), f"{c}[{', '.join(ivars)}]", out.shape[-2], out.shape[-1], kdim)
        w.dedent(len(batch))

    # -- kernels --------------------------------------------------------------------------------
    def kernels(self, w: Writer) -> None:
        for i, ph in enumerate(self.phases):
            if isinstance(ph.nest, Gemm):
                continue
            w("@cuda.jit")
            w(f"def {self.k.name}_{i}({', '.join(self.signature())}):")
            w.indent()
            self._shared = {}
            inner = Writer()
            inner.depth = w.depth
            self.w = inner
            self.stmts(ph.preamble)
            if ph.nest is None:
                self.stmts(ph.tail)
            elif self._serial(ph.nest):
                self.serial(ph.nest)
                self.stmts(ph.tail)
            elif self._rows(ph.nest):
                self.rows(ph.nest, ph.tail)
            else:
                self.flat(ph.nest, ph.tail)
            for name, (size, dtype) in self._shared.items():
                w(f"{name} = cuda.shared.array({size}, {dtype})")
            w.lines += inner.lines
            w("return")
            w.dedent()
            w()

    @staticmethod
    def _rows(f: For) -> bool:
        return any(isinstance(s, For) for s in f.body)

    @staticmethod
    def _serial(f: For) -> bool:
        """Iterations that read back what they overwrite (no atomic form): one thread runs them."""
        if f.independent:
            return False
        stored = {id(s.buf) if isinstance(s.buf, Value) else s.buf for s in walk(f.body)
                  if isinstance(s, Store) and not s.add}
        return any(isinstance(s, Load) and (id(s.buf) if isinstance(s.buf, Value) else s.buf) in stored
                   for s in walk(f.body))

    def stmts(self, body: list, threads: str | None = None) -> None:
        for s in body:
            self.stmt(s, threads)

    def stmt(self, s, threads: str | None) -> None:
        w = self.w
        if isinstance(s, Let):
            w(f"{s.local} = {s.expr}")
        elif isinstance(s, Load):
            w(f"{s.local} = {_buf(s.buf)}{_index(s.index)}")
        elif isinstance(s, Store):
            index = _index(s.index)
            at = ", ".join(map(ix_text, s.index)) or "0"
            atomic = f"cuda.atomic.add({_buf(s.buf)}, {at if len(s.index) < 2 else '(' + at + ')'}, {s.local})"
            if s.add and threads is not None:  # a per-row statement: every thread of the block runs it
                w("if cuda.threadIdx.x == 0:")
                w(f"    {atomic}")
            elif s.add:
                w(atomic)
            else:
                w(f"{_buf(s.buf)}{index} = {s.local}")
        elif isinstance(s, Scratch):  # inside a nest: per row, in shared memory
            if len(s.shape) != 1 or not s.shape[0].isdigit():
                raise CodegenError(f"kernel {self.k.name}: a per-row scratch of {list(s.shape)} needs a static "
                                   "row length on the CUDA backend")
            self._shared[s.name] = (s.shape[0], CTOR[s.dtype])
        elif isinstance(s, For):
            self.serial(s) if threads is None else self.strided(s, threads)
        else:
            raise AssertionError(s)

    def serial(self, f: For) -> None:
        """A loop nest run by the thread that reaches it, reductions in registers."""
        w = self.w
        for r in f.reductions:
            w(f"{r.acc} = {r.identity}")
        for v, e in zip(f.vars, f.extents, strict=True):
            w(f"for {v} in range({e}):")
            w.indent()
        self.stmts(f.body)
        self._combine(f)
        w.dedent(len(f.vars))

    def _combine(self, f: For) -> None:
        for r in f.reductions:
            self.w(f"{r.acc} = {r.combine.format(a=r.acc, b=r.operand)}" if r.combine != SUM
                   else f"{r.acc} += {r.operand}")

    def _unravel(self, f: For, flat: str) -> None:
        rest = flat
        for d in range(len(f.vars) - 1, -1, -1):
            if d:
                self.w(f"{f.vars[d]} = {rest} % ({f.extents[d]})")
                self.w(f"{f.vars[0]}_q{d} = {rest} // ({f.extents[d]})")
                rest = f"{f.vars[0]}_q{d}"
            else:
                self.w(f"{f.vars[d]} = {rest}")

    def strided(self, f: For, threads: str) -> None:
        """An inner loop split over the block's threads; its reductions end in block reductions
        (every thread then holds the result), and a barrier lets later loops read what it wrote."""
        w = self.w
        self._grid_stride(f, "_flat", threads, str(self.block))
        for r in f.reductions:
            self.block_reduce(r.acc, r.combine, r.ctor, r.identity)
        w("cuda.syncthreads()")

    def block_reduce(self, acc: str, combine: str, ctor: str, identity: str) -> None:
        """``acc`` combined over the block's threads, in every thread: by warp shuffles where the
        printer has warps, else as a tree in shared memory."""
        if self.warp and ctor in SHUFFLED and self.block % self.warp == 0 and self.block // self.warp <= self.warp:
            return self.shuffle_reduce(acc, combine, ctor, identity)
        w = self.w
        sh = f"red_{ctor}"
        self._shared[sh] = (self.block, ctor)
        w(f"{sh}[cuda.threadIdx.x] = {acc}")
        w("cuda.syncthreads()")
        w(f"_half = {self.block // 2}")
        w("while _half > 0:")
        w("    if cuda.threadIdx.x < _half:")
        mine, other = f"{sh}[cuda.threadIdx.x]", f"{sh}[cuda.threadIdx.x + _half]"
        w(f"        {mine} = {combine.format(a=mine, b=other)}")
        w("    cuda.syncthreads()")
        w("    _half //= 2")
        w(f"{acc} = {sh}[0]")
        w("cuda.syncthreads()")

    def shuffle_reduce(self, acc: str, combine: str, ctor: str, identity: str) -> None:
        """Each warp combines its lanes with ``shfl_down`` (lane 0 ends with the warp's value),
        the warps' values meet in shared memory, and every warp combines those the same way and
        broadcasts lane 0's: all threads take the same path (no thread waits on a branch)."""
        w, lanes, warps = self.w, self.warp, self.block // self.warp
        sh = f"warp_{ctor}"
        self._shared[sh] = (warps, ctor)
        mask = f"0x{(1 << lanes) - 1:x}" if lanes < 32 else "0xffffffff"

        def within_warp():
            w(f"_off = {lanes // 2}")
            w("while _off > 0:")  # every lane shuffles once per step, outside the combine's branches
            w(f"    _from_{ctor} = cuda.shfl_down_sync({mask}, {acc}, _off)")
            w(f"    {acc} = {combine.format(a=acc, b=f'_from_{ctor}')}")
            w("    _off //= 2")
        within_warp()
        w(f"if cuda.threadIdx.x % {lanes} == 0:")
        w(f"    {sh}[cuda.threadIdx.x // {lanes}] = {acc}")
        w("cuda.syncthreads()")
        w(f"{acc} = {sh}[cuda.threadIdx.x % {lanes}] if cuda.threadIdx.x % {lanes} < {warps} else {identity}")
        within_warp()
        w(f"{acc} = cuda.shfl_sync({mask}, {acc}, 0)")
        w("cuda.syncthreads()")

    def rows(self, f: For, tail: list) -> None:
        """One block per iteration of ``f`` (grid-stride over blocks); a reducing ``f`` runs in
        one block, whose accumulators are uniform across its threads."""
        self._grid_stride(f, "_row", "cuda.blockIdx.x", "cuda.gridDim.x", threads="cuda.threadIdx.x")
        self._on_thread_0(tail)

    def flat(self, f: For, tail: list) -> None:
        """One thread per iteration; a reducing ``f`` runs in one block and reduces across it."""
        self._grid_stride(f, "_flat", "cuda.grid(1)", "cuda.gridsize(1)")
        for r in f.reductions:
            self.block_reduce(r.acc, r.combine, r.ctor, r.identity)
        self._on_thread_0(tail)

    def _grid_stride(self, f: For, var: str, start: str, step: str, threads: str | None = None) -> None:
        """``f``'s iterations from ``start`` by ``step`` (a block's rows: its threads share each
        one, with a barrier before the next)."""
        w = self.w
        for r in f.reductions:
            w(f"{r.acc} = {r.identity}")
        w(f"{var} = {start}")
        w(f"while {var} < {count(f.extents)}:")
        w.indent()
        self._unravel(f, var)
        self.stmts(f.body, threads=threads)
        self._combine(f)
        if threads is not None:
            w("cuda.syncthreads()")
        w(f"{var} += {step}")
        w.dedent()

    def _on_thread_0(self, tail: list) -> None:
        if tail:
            self.w("if cuda.threadIdx.x == 0:")
            self.w.indent()
            self.stmts(tail)
            self.w("pass")
            self.w.dedent()


# ---- the module -----------------------------------------------------------------------------
HEADER = '''"""Generated by gradfuse from @{name}; do not edit: one training/inference step as Numba CUDA kernels."""
import math

import numpy as np
from numba import cuda

f32, f64, i32, i64, b1 = np.float32, np.float64, np.int32, np.int64, np.bool_
'''

FILL = """

@cuda.jit
def fill(a, value):
    i = cuda.grid(1)
    while i < a.shape[0]:
        a[i] = value
        i += cuda.gridsize(1)
"""


def print_module(prog: KernelProgram, block: int = 256, in_place: frozenset[str] = frozenset(),
                 tiles: GemmTiles = GPU_TILES, max_blocks: int = MAX_BLOCKS, warp: int = 32) -> str:
    """The program as a module of ``@cuda.jit`` kernels and a Python ``step`` launching them."""
    g = prog.graph
    kernels, step = Writer(), Writer()
    printers = []
    shared: dict[str, str] = {}  # canonical code -> the kernel that defines it (codegen/cpu.py's rule)
    for k in prog.kernels:
        if is_host(k):
            continue
        kp = CudaKernelPrinter(k, block, tiles, max_blocks, warp)
        printers.append(kp)
        mine = Writer()
        kp.kernels(mine)
        # the widths stay in the code: a CUDA kernel compiles them in (no integer arguments here)
        code = canonical_kernel(kp.signature(), [line for line in mine.lines if not line.startswith("def ")],
                                integers_as_arguments=False)
        first = shared.setdefault(code, k.name)
        if first == k.name:
            kernels.lines += mine.lines
            continue
        kernels(f"# {k.name}: the code of {first} on its own buffers (compiled once)")  # an identical layer
        for i, ph in enumerate(kp.phases):
            if not isinstance(ph.nest, Gemm):
                kernels(f"{k.name}_{i} = {first}_{i}")
        kernels()
    args = [arr(v) for _, v in g.args]
    bufs = [arr(v) for v in prog.buffers]
    step(f"def step({', '.join(args + bufs)}):")
    step.indent()
    bound = set()
    for _, v in g.args:
        for axis, d in enumerate(v.type.shape):
            if isinstance(d, str) and "*" not in d and d not in bound:  # a product (N*32) binds nothing
                step(f"{d} = {arr(v)}.shape[{axis}]")
                bound.add(d)
    by_name = {kp.k.name: kp for kp in printers}
    returned = set(prog.buffers)
    for item in prog.schedule:
        if isinstance(item, Node):  # a view
            x, y = item.inputs[0], item.outputs[0]
            shape = "(" + "".join(f"{d}, " for d in y.type.shape) + ")" if y.type.shape else "(1,)"
            if y in returned:
                step(f"{arr(y)}.copy_to_device({arr(x)}.reshape({shape}))")
            else:
                step(f"{arr(y)} = {arr(x)}.reshape({shape})")
        elif is_host(item):  # an all-reduce, at once, through host memory
            (n,) = item.nodes
            step(f"{arr(n.outputs[0])}.copy_to_device(_dist.allreduce_now({arr(n.inputs[0])}.copy_to_host(), "
                 f"{n.attrs['ranks']}))")
        else:
            by_name[item.name].launches(step)
    for old, new in g.updates:  # updates the kernels did not write in place
        if new is not old and old.name not in in_place:
            step(f"{arr(old)}.copy_to_device({arr(new)})")
    step("return 0")
    code = "\n".join(kernels.lines + step.lines)
    helpers = [helper_source(name, ftype, "@cuda.jit(device=True, inline=\"always\")", backend="cuda")
               for name, ftype in ordered_helpers(helpers_used(code, backend="cuda"))]
    library = "".join(tiles.source(F) for F in ("f32", "f64")) + FILL
    if "_dist." in code:
        library += "\nfrom gradfuse.runtime import distributed as _dist\n"
    return HEADER.format(name=g.name) + "\n\n" + "\n\n".join(helpers) + "\n" + library + "\n\n" + code + "\n"


class SimulatorMath:
    """``math`` for kernels the simulator runs as Python: numpy's IEEE results where Python's
    math raises (log(0) = -inf, sqrt(-1) = NaN, floor(inf)), as the device gives them."""

    def __init__(self):
        import math

        self._math = math
        for name in ("log", "log1p", "sqrt", "exp", "expm1", "floor", "ldexp", "tanh", "pow"):
            setattr(self, name, self._quiet(getattr(np, "power" if name == "pow" else name)))

    @staticmethod
    def _quiet(f):
        def call(*args):
            with np.errstate(all="ignore"):
                return f(*args)
        return call

    def __getattr__(self, name):
        return getattr(self._math, name)


IEEE_MATH = SimulatorMath()


def _lock_simulated_shared_arrays() -> None:
    """numba-cuda's simulator (0.30.4) makes a block's ``cuda.shared.array`` when the first of its
    threads asks, by a look-up then an insert without a lock, keyed by the calling line found by
    ``traceback.extract_stack`` (slow on a deep stack, so a thread switch inside it is likely at
    the switch interval above): two threads can each make one, and then do not share memory.
    A run of the simulator suite once gave a wrong row of a GEMM that way (or so it looked).
    Here the look-up and insert are one step under a lock, keyed by the caller's frame."""
    import threading

    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np.numpy_support import as_dtype

    shared = kernelapi.FakeCUDAShared
    if getattr(shared, "locked_by_gradfuse", False):
        return
    lock, original = threading.Lock(), shared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory (one buffer), or refused
            return original(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            if key not in self._allocations:
                self._allocations[key] = np.empty(shape, as_dtype(dtype) if isinstance(dtype, types.Type) else dtype)
            return self._allocations[key]

    shared.array, shared.locked_by_gradfuse = array, True


class CUDABackend:
    """The runtime's view of the CUDA backend (``cuda`` on a GPU, ``cudasim`` in Numba's
    simulator): the step takes device arrays; ``call`` moves a run's arrays across."""

    def __init__(self, name: str, block: int | None = None, warp: int | None = None):
        self.name = name
        self.target = TARGETS[name]
        # the simulator runs each thread as a Python thread (~165 us each): a few threads per block
        # and a few blocks still take every path (strided rows, tree reductions, grid-stride loops);
        # it has no warp shuffles, so its reductions are shared-memory trees
        sim = name == "cudasim"
        self.block, self.tiles, self.max_blocks = (4, SIM_TILES, 4) if sim else (256, GPU_TILES, MAX_BLOCKS)
        self.block = block or self.block
        self.warp = warp if warp is not None else 0 if sim else 32

    @staticmethod
    def missing_lowering(op: OpDef) -> str | None:
        return missing_lowering(op)

    def require(self) -> None:
        """Refuse, in words, where this target cannot run here."""
        from gradfuse.errors import GradfuseError

        sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
        if self.name == "cudasim" and not sim:
            raise GradfuseError("--target cudasim needs NUMBA_ENABLE_CUDASIM=1 in the environment before Numba "
                                "starts (run: NUMBA_ENABLE_CUDASIM=1 gradfuse ...)")
        if self.name == "cuda":
            from numba import cuda

            if sim or not cuda.is_available():
                raise GradfuseError("--target cuda: no CUDA GPU here (numba.cuda.is_available() is False); use "
                                    "--target cpu, or --target cudasim to run the CUDA kernels in Numba's simulator")

    def print_module(self, prog: KernelProgram, in_place: frozenset[str] = frozenset()) -> str:
        return print_module(prog, self.block, in_place, self.tiles, self.max_blocks, self.warp)

    def load(self, source: str, cache_dir: str, stem: str):
        """Import the module (no GPU needed: ``cuda.jit`` compiles at the first launch, and the
        PTX of an artifact compiles without one); the first run checks for the GPU."""
        if self.name == "cudasim":
            self.require()
            # The simulator runs each GPU thread as a Python thread while its block manager polls
            # them in a loop that holds the GIL: at Python's default 5 ms switch interval every
            # simulated thread waits for that loop, and a block of 4 threads takes ~20 ms. At
            # 0.1 ms the op-table test runs 5x faster. (Process-wide, set by the simulator target only.)
            sys.setswitchinterval(min(sys.getswitchinterval(), 1e-4))
            _lock_simulated_shared_arrays()
        name = f"gfcuda_{stem}_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
        path = os.path.join(cache_dir, f"{name}.py")
        if not os.path.exists(path):
            with atomic_file(path, CACHE, "w") as f:
                f.write(source)
        return self.import_file(path), path

    def import_file(self, path: str):
        from .cpu import CPUBackend

        module = CPUBackend.import_file(path)
        if self.name == "cudasim":
            module.math = IEEE_MATH  # the kernels run as Python there: see SimulatorMath
        elif os.environ.get("GRADFUSE_CUDA_GEMM") == "cublas":  # on a GPU, to measure cuBLAS beside the tiled GEMM
            module.gemm_f32 = module.gemm_f64 = CublasGemm()
        return module

    @staticmethod
    def compile_entry(module, args, buffers):
        return None  # the step launches from Python

    @staticmethod
    def argument(v: Value) -> str:
        return arr(v)

    def kernel_arguments(self, k: Kernel) -> list[str]:
        return CudaKernelPrinter(k, self.block, self.tiles, self.max_blocks, self.warp).signature()

    @staticmethod
    def unwritten(k: Kernel, prog: KernelProgram):
        return None

    @staticmethod
    def empty(shape: tuple, dtype):
        """Device memory for the memory plan's arena and the buffers outside it."""
        from gradfuse.runtime.device import empty

        return empty(shape, dtype)


BACKENDS = {name: CUDABackend(name) for name in ("cuda", "cudasim")}
BACKEND = BACKENDS["cuda"]
SIM_BACKEND = BACKENDS["cudasim"]


def kernel_types(prog: KernelProgram, block: int = 256) -> dict[str, str]:
    """Each phase kernel's Numba signature (``void(float32[:, ::1], ..., int64)``): what
    :func:`numba.cuda.compile_ptx` needs to compile it ahead of time, with no GPU."""
    def array(dtype, rank: int) -> str:
        return f"{np.dtype(dtype).name.replace('bool', 'boolean')}[{', '.join([':'] * (max(rank, 1) - 1) + ['::1'])}]"

    out = {}
    for k in prog.kernels:
        if is_host(k):
            continue
        kp = CudaKernelPrinter(k, block)
        params = [array(v.type.dtype.np, v.type.rank) for v in dict.fromkeys(k.reads + k.writes)]
        params += [array(s.dtype.np, len(s.shape)) for s in kp.scratch]
        params += ["int64"] * len(kp.symbols)
        for i, ph in enumerate(kp.phases):
            if not isinstance(ph.nest, Gemm):
                out[f"{k.name}_{i}"] = f"void({', '.join(params)})"
    return out
