"""A compiled program: generated kernels on disk, buffers, and a checked entry point.

``Program.run(feeds)`` checks every argument against the graph's signature (dtype, shape,
layout, index ranges) before any kernel runs, binds the batch size, reuses the buffers made
for that batch size, and calls the generated ``step`` function once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from gradfuse.codegen.kernel_ir import KernelProgram, lower
from gradfuse.codegen.targets import get_backend
from gradfuse.errors import InputError, NumericError
from gradfuse.ir.graph import ArgKind, Graph
from gradfuse.ir.registry import get_op
from gradfuse.runtime.device import on_device, run_step

DEFAULT_CACHE = os.environ.get("GRADFUSE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gradfuse"))


def plan_storage(kernels: KernelProgram, batch: int = 256, target: str = "cpu") -> frozenset[str]:
    """The updated arguments the memory plan writes in place; and on each kernel, the buffers it
    reads whose storage one it writes takes over (``Kernel.same_storage``: the printers load them
    by the written array's name, so LLVM sees one array and vectorises the loop instead of
    falling back to scalar code when its run-time overlap check fails). Both depend on the
    schedule, not on sizes; :meth:`Program.buffers` checks that at each size it plans."""
    from gradfuse.passes.memory import plan_memory

    plan = plan_memory(kernels.graph, batch=batch, reorder=False, target=target)
    fresh = set(kernels.graph.outputs)  # run() returns outputs in arrays of their own, whatever the plan
    for k in kernels.kernels:
        k.same_storage = {x: y for y in k.writes for x in k.reads
                          if x is not y and not {x, y} & fresh and _same_storage(plan, x, y)}
    return frozenset(u.arg for u in plan.updates if u.in_place)


def _same_storage(plan, x, y) -> bool:
    px, py = plan.values.get(x.name), plan.values.get(y.name)
    return (px is not None and py is not None and x.type == y.type and px.storage is not None
            and (px.storage, px.offset) == (py.storage, py.offset))


class CompileProgress:
    """``[####......] 12/40 kernels`` on stderr while kernels compile, if stderr is a terminal
    and compiling has taken more than ``after`` seconds; nothing otherwise (logs stay clean)."""

    def __init__(self, total: int, stream=None, after: float = 1.0, width: int = 30):
        self.total, self.done, self.after, self.width = total, 0, after, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start, self.shown = time.perf_counter(), False

    def __call__(self) -> None:
        self.done += 1
        if self.tty and (self.shown or time.perf_counter() - self.start > self.after):
            self.shown = True
            filled = self.width * self.done // max(self.total, 1)
            self.stream.write(f"\rcompiling [{'#' * filled}{'.' * (self.width - filled)}] "
                              f"{self.done}/{self.total} kernels")
            self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * (self.width + 40) + "\r")
            self.stream.flush()


def compile_kernels(programs: list) -> None:
    """Every distinct kernel of the CPU ``programs`` compiled (or loaded from Numba's cache) now,
    on every core where many are new (runtime/compile_workers.py), with the progress bar; their
    first runs then compile none."""
    from gradfuse.runtime.compile_workers import compile_all

    todo = list({id(fn): (fn, sig) for p in programs for fn, sig in p.distinct_kernels()}.values())
    bar = CompileProgress(len(todo))
    try:
        compile_all(todo, bar)
    finally:
        bar.close()
    for p in programs:
        p._precompiled = True


class _SlowPath(Exception):
    pass


@dataclass
class _Launch:
    buffers: list  # per kernel buffer: its array, or None where filled per call
    fresh: list  # (position, shape, dtype): outputs, a new array each call
    in_place: list  # (position, argument index, shape): arguments written in place
    outputs: list  # per graph output: (buffer position, None) or (None, argument index)
    updated_outputs: list = field(default_factory=list)  # outputs that are arguments the step updates


@dataclass
class Program:
    graph: Graph
    kernels: KernelProgram
    source: str
    path: str
    module: object
    compile_seconds: float = 0.0
    kernel_counts: tuple[int, int] = (0, 0)  # (kernels compiled, kernels sharing another's code)
    in_place: frozenset[str] = frozenset()  # updated arguments the kernels write directly (no copy)
    one_dispatch: bool = False  # run through checked_step compiled with a signature (see _run_compiled)
    backend: object = field(default_factory=get_backend)  # prints, loads and names (codegen/targets.py)
    _buffers: dict[tuple, list[np.ndarray | int]] = field(default_factory=dict)

    def __post_init__(self):
        self._buffer_index = {v: i for i, v in enumerate(self.kernels.buffers)}
        self._arg_index = {v: i for i, (_, v) in enumerate(self.graph.args)}
        self._signature = [(kind, v, v.type.dtype.np, v.type.shape) for kind, v in self.graph.args]
        # per argument: name, dtype, rank, shape, the shape as a tuple if it has no symbol (else
        # None), whether it is written in place: what the fast path of bind() compares
        self._fast_signature = [
            (v.name, dtype, len(shape), shape, None if any(isinstance(d, str) for d in shape) else tuple(shape),
             kind is not ArgKind.input) for kind, v, dtype, shape in self._signature]
        # an argument with a product dimension (N*32, a loss graph's flattened prediction) is checked
        # after the plain symbols are bound, on the checked path
        self._products = any(isinstance(d, str) and "*" in d for _, v in self.graph.args for d in v.type.shape)
        self._checks = [(n, c) for n in self.graph.nodes for c in get_op(n.op).checks]  # see _check_indices
        self._index_checks = bool(self._checks)
        self._launches: dict[tuple, _Launch] = {}
        self._arg_names = [v.name for _, v in self.graph.args]
        seen: dict[str, tuple[int, int]] = {}  # batch symbol -> (argument, axis) it is read from
        for i, (_, v) in enumerate(self.graph.args):
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, str) and "*" not in d:
                    seen.setdefault(d, (i, axis))
        self._symbol_sources = [(d, i, axis) for d, (i, axis) in seen.items()]
        self._compiled_step = None  # checked_step under its signature, once compiled; False if it cannot be
        self._written = [kind is not ArgKind.input for kind, _ in self.graph.args]  # what a step may update
        self.updates = frozenset(old.name for old, new in self.graph.updates if new is not old)
        self._device = self.backend.target.name != "cpu"  # arguments and buffers in device memory
        self._device_ready = False
        self._precompiled = False  # every distinct kernel compiled (compile_kernels)

    @classmethod
    def compile(cls, graph: Graph, cache_dir: str = DEFAULT_CACHE, target: str = "cpu", backend=None,
                shared: dict | None = None) -> Program:
        """Lower ``graph`` (fused and planned) for ``target`` and load its module from the backend
        (``backend``: one configured otherwise than the target's, e.g. another block size).
        ``shared`` (CPU): the kernel functions of programs compiled before, which this one calls
        where its kernels have their code (the training step calls the predict program's); this
        program's are added."""
        start = time.perf_counter()
        backend = backend or get_backend(target)
        kernels = lower(graph, target)
        in_place = plan_storage(kernels, 256, target)
        # `step` in Python, `checked_step` for one_dispatch
        source = backend.print_module(kernels, in_place) if shared is None else \
            backend.print_module(kernels, in_place, shared)
        module, path = backend.load(source, cache_dir, graph.name)
        for code in (shared or {}).values():
            if code.module is None:  # defined in the module just loaded
                code.module = os.path.basename(path)
        prog = cls(graph, kernels, source, path, module, in_place=in_place, backend=backend)
        prog.compile_seconds = time.perf_counter() - start
        counts = getattr(backend, "kernel_counts", None)
        prog.kernel_counts = counts(source) if counts else (len(kernels.kernels), 0)
        return prog

    @property
    def checks_indices(self) -> bool:
        """Whether some input is checked beyond dtype and shape (labels, ids) before a run."""
        return self._index_checks

    # -- checks at the boundary -----------------------------------------------------------
    def bind(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, int], list[np.ndarray]]:
        """Check ``feeds`` against the signature; returns the symbol sizes and the argument
        arrays in order (converted where users expect it: Python numbers, lists)."""
        sizes: dict[str, int] = {}
        arrays = []
        try:  # fast path: every feed already an array of the right dtype, shape and layout
            for name, dtype, ndim, shape, fixed, written in self._fast_signature:
                a = feeds[name]
                if (self._products or a.__class__ is not np.ndarray or a.dtype != dtype or a.ndim != ndim
                        or not a.flags.c_contiguous or (written and not a.flags.writeable)):
                    raise _SlowPath
                if fixed is None:
                    for want, got in zip(shape, a.shape, strict=True):  # ranks are equal
                        if got != want and (want.__class__ is not str or not got
                                            or sizes.setdefault(want, got) != got):
                            raise _SlowPath
                elif a.shape != fixed:
                    raise _SlowPath
                arrays.append(a)
        except (_SlowPath, KeyError):
            return self._bind_checked(feeds)
        if self._index_checks:
            self._check_indices(dict(zip((v.name for _, v in self.graph.args), arrays, strict=True)), sizes)
        return sizes, arrays

    def _bind_checked(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, int], list[np.ndarray]]:
        """bind() for feeds that need converting or are wrong: converts or says what is wrong."""
        g = self.graph
        missing = [v.name for _, v in g.args if v.name not in feeds]
        if missing:
            raise InputError(f"@{g.name}: missing {', '.join(missing)}")
        sizes: dict[str, int] = {}
        arrays = []
        for kind, v, dtype, shape in self._signature:
            a = feeds[v.name]
            if self._device and on_device(a):
                arrays.append(self._check_device_array(kind, v, a, sizes))
                continue
            if not isinstance(a, np.ndarray):
                a = np.asarray(a, dtype=dtype)
            if a.dtype != dtype:
                raise InputError(f"%{v.name} ({kind.value}) expects {v.type}, got an array of dtype {a.dtype} "
                                 f"(convert it with .astype(np.{dtype.name}))")
            if a.ndim != len(shape):
                raise InputError(f"%{v.name} ({kind.value}) expects {v.type}, got shape {list(a.shape)}")
            for want, got in zip(shape, a.shape, strict=True):
                if want.__class__ is str and "*" in want:
                    continue  # a product: checked below, once its symbols are bound
                if want.__class__ is str:
                    if got == 0:
                        raise InputError(f"%{v.name}: the batch is empty (shape {list(a.shape)})")
                    if sizes.setdefault(want, got) != got:
                        raise InputError(f"%{v.name} has {want}={got}, but an earlier input has {want}={sizes[want]}")
                elif want != got:
                    raise InputError(f"%{v.name} ({kind.value}) expects {v.type}, got shape {list(a.shape)}")
            if not a.flags.c_contiguous:
                if kind is not ArgKind.input:
                    raise InputError(f"%{v.name} must be C-contiguous (it is updated in place)")
                a = np.ascontiguousarray(a)
            if kind is not ArgKind.input and not a.flags.writeable:
                raise InputError(f"%{v.name} is read-only, but the step updates it in place")
            arrays.append(a)
        if self._products:
            for (kind, v, _, _), a in zip(self._signature, arrays, strict=True):
                if v.type.concrete(sizes) != (a.shape if not on_device(a) or v.type.rank else ()):
                    raise InputError(f"%{v.name} ({kind.value}) expects {v.type}, got shape {list(a.shape)}")
        if self._index_checks:
            self._check_indices(dict(zip((v.name for _, v in g.args), arrays, strict=True)), sizes)
        return sizes, arrays

    def _check_device_array(self, kind: ArgKind, v, a, sizes: dict[str, int]):
        """A feed already in device memory: its dtype, shape (binding the batch symbols) and
        layout checked as a host array's are; its values stay where they are."""
        shape = v.type.shape
        got = tuple(a.shape) if shape else ()
        if a.dtype != v.type.dtype.np or len(got) != len(shape) or (not shape and a.size != 1):
            raise InputError(f"%{v.name} ({kind.value}) expects {v.type}, got a device array "
                             f"{a.dtype}{list(a.shape)}")
        for want, n in zip(shape, got, strict=True):
            if want.__class__ is str and "*" in want:
                continue
            if (sizes.setdefault(want, n) if want.__class__ is str else want) != n:
                raise InputError(f"%{v.name} ({kind.value}) expects {v.type}, got a device array of shape "
                                 f"{list(got)}" + (f" ({want}={sizes[want]} elsewhere)" if want in sizes else ""))
        if not a.is_c_contiguous():
            raise InputError(f"%{v.name}: the device array must be C-contiguous")
        if self._checks and any(v in n.inputs for n, _ in self._checks):
            raise InputError(f"%{v.name} is checked before a run (labels, ids in range): pass it as a host array")
        return a

    def _check_indices(self, by_name: dict[str, np.ndarray], sizes: dict[str, int]) -> None:
        """What kernels assume of the arguments beyond dtype and shape, from the ops' records
        (``OpDef.checks``): labels and ids that index tables lie in range (a kernel would read or
        write out of bounds), batch statistics have two rows."""
        for n, check in self._checks:
            check.run(n, by_name, sizes)

    def memory_plan(self, sizes: dict[str, int]):
        """The memory plan for these batch sizes, in the program's own schedule."""
        from gradfuse.passes.memory import plan_memory

        return plan_memory(self.graph, sizes=sizes, reorder=False, target=self.backend.target.name)

    def buffers(self, sizes: dict[str, int]) -> list[np.ndarray | int]:
        """Storage for every buffer of the schedule at these batch sizes: views into one arena
        laid out by the memory plan, or (an int) the index of the argument whose storage a value
        takes over in place, resolved per call because the caller owns the arguments."""
        key = tuple(sorted(sizes.items()))
        if key not in self._buffers:
            plan = self.memory_plan(sizes)
            if frozenset(u.arg for u in plan.updates if u.in_place) != self.in_place:
                raise AssertionError(f"@{self.graph.name}: the memory plan at {sizes} writes other updates in place "
                                     "than the generated code assumes")
            for k in self.kernels.kernels:
                if not all(_same_storage(plan, x, y) for x, y in k.same_storage.items()):
                    raise AssertionError(f"@{self.graph.name}: the memory plan at {sizes} does not share the storage "
                                         f"{k.name}'s code reads through the arrays it writes")
            arena = self.backend.empty((plan.peak,), np.uint8)
            args = [v.name for _, v in self.graph.args]
            out: list[np.ndarray | int] = []
            for v in self.kernels.buffers:
                place = plan.values[v.name]
                shape = v.type.concrete(sizes)
                if self._device and not shape:
                    shape = (1,)  # a 0-d value is one element on the device (x[0] in the kernels)
                if place.offset is not None:
                    out.append(arena[place.offset:place.offset + place.nbytes].view(v.type.dtype.np).reshape(shape))
                elif place.storage in args:
                    out.append(args.index(place.storage))
                else:  # the plan keeps it in registers, but this kernel writes it: own allocation
                    out.append(self.backend.empty(shape, v.type.dtype.np))
            self._buffers[key] = out
        return self._buffers[key]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; returns the outputs (fresh arrays the kernels write into, so nothing is
        copied). Params and state are updated in place in the arrays passed in ``feeds``."""
        if self.one_dispatch and self._compiled_step is not False:
            out = self._run_compiled(feeds)
            if out is not None:
                return out
        sizes, arrays = self.bind(feeds)
        self._compile_kernels()
        launch = self._launches.get(tuple(sizes.items()))
        if launch is None:
            launch = self._launches[tuple(sizes.items())] = self._launch(sizes)
        return self._call(self.module.step, launch, arrays)

    def run_on_device(self, feeds: Mapping[str, object]) -> list:
        """:meth:`run` on a device program, its outputs left in device memory (for work that
        continues on the GPU, and for timing the kernels without the copy back)."""
        if not self._device:
            raise InputError(f"@{self.graph.name} runs on the CPU: use run()")
        sizes, arrays = self.bind(feeds)
        launch = self._launches.get(tuple(sizes.items()))
        if launch is None:
            launch = self._launches[tuple(sizes.items())] = self._launch(sizes)
        self.require_device()
        return run_step(self.module.step, launch, arrays, self._written, host_outputs=False)

    def _call(self, step, launch: _Launch, arrays: list[np.ndarray]) -> list[np.ndarray] | None:
        if self._device:
            self.require_device()
            return run_step(step, launch, arrays, self._written)
        bufs = launch.buffers.copy()
        for at, shape, dtype in launch.fresh:
            bufs[at] = np.empty(shape, dtype)
        for at, arg, shape in launch.in_place:
            bufs[at] = arrays[arg].reshape(shape)
        before = {arg: arrays[arg].copy() for arg in launch.updated_outputs}  # returned as they came in
        if step(*arrays, *bufs):
            return None  # checked_step found a wrong shape and ran nothing
        return [bufs[at] if at is not None else before[arg] if arg in before else arrays[arg].copy()
                for at, arg in launch.outputs]

    def require_device(self) -> None:
        """Refuse, in words and before anything is copied or launched, where the program's
        device is missing (no GPU; the simulator not enabled)."""
        if not self._device_ready:
            self.backend.require()
            self._device_ready = True

    def _run_compiled(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
        """One compiled call that checks and runs: Numba's dispatcher matches every argument's
        dtype, rank and C layout against the signature, ``checked_step`` the shapes. The Python
        path (bind, then a dispatch per kernel) costs ~8 us more per call, which is what batch-1
        inference is made of; a compiled caller costs about a second of compile once (cached).
        None where anything is off (or at a new batch size): the checked path then runs, or says
        what is wrong."""
        try:
            arrays = [feeds[name] for name in self._arg_names]
            key = tuple((d, arrays[i].shape[axis]) for d, i, axis in self._symbol_sources)
        except (KeyError, AttributeError, IndexError):
            return None
        launch = self._launches.get(key)
        if launch is None:
            return None
        if self._compiled_step is None:
            self.compile_checked_step()
            if self._compiled_step is False:
                return None
        try:
            return self._call(self._compiled_step, launch, arrays)
        except TypeError:  # an argument whose type is not the signature's: nothing ran
            return None

    def distinct_kernels(self) -> list[tuple[object, list]]:
        """(Numba dispatcher, its argument types) for every function the module compiles: one per
        distinct kernel code (the layers that share one appear once). The types are those run()
        passes: C-contiguous arrays, int64 sizes and integers (a shared function's LITERALS)."""
        from numba import from_dtype, types

        seen, out = set(), []
        for k in self.kernels.kernels:
            fn = getattr(self.module, k.name, None)
            if fn is None or not hasattr(fn, "compile") or id(fn) in seen:
                continue
            seen.add(id(fn))
            buffers = dict.fromkeys(k.reads + k.writes)
            sig = [types.Array(from_dtype(v.type.dtype.np), v.type.rank, "C") for v in buffers]
            sig += [types.int64] * (len(k.symbols) + len(self._literals(k)))
            out.append((fn, sig))
        return out

    def _literals(self, k) -> tuple[int, ...]:
        """The integers a kernel passes to the code it shares with others (its widths, a dropout's
        stream), after its buffers and sizes."""
        return getattr(self.module, "LITERALS", {}).get(k.name, ())

    def _compile_kernels(self) -> None:
        """Before the first run: every distinct kernel compiled at once (what the run would do
        lazily, one by one), unless compile_kernels did it already."""
        if not self._precompiled and not self._device:
            compile_kernels([self])

    def compile_checked_step(self) -> None:
        """Compile ``checked_step`` under its signature now (the backend caches it beside the
        kernels, so an artifact saved afterwards carries it); False where it cannot: the Python
        path stays."""
        self._compile_kernels()  # the kernels first, on every core; then the caller, which links them
        self._compiled_step = self.backend.compile_entry(self.module, [v for _, v in self.graph.args],
                                                         self.kernels.buffers) or False

    def _launch(self, sizes: dict[str, int]) -> _Launch:
        """What run() does at these sizes, worked out once: which buffers are fresh outputs,
        which are arguments written in place, and where each output comes from."""
        fresh = {v for v in self.graph.outputs if v in self._buffer_index}
        launch = _Launch(buffers=[], fresh=[], in_place=[], outputs=[])
        for at, (b, v) in enumerate(zip(self.buffers(sizes), self.kernels.buffers, strict=True)):
            launch.buffers.append(None if v in fresh or isinstance(b, int) else b)
            if v in fresh:
                launch.fresh.append((at, v.type.concrete(sizes), v.type.dtype.np))
            elif isinstance(b, int):
                launch.in_place.append((at, b, v.type.concrete(sizes)))
        launch.outputs = [(self._buffer_index[v], None) if v in fresh else (None, self._arg_index[v])
                          for v in self.graph.outputs]
        updated = {self._arg_index[old] for old, new in self.graph.updates if new is not old}
        launch.updated_outputs = [arg for _, arg in launch.outputs if arg in updated]
        return launch

    def run_checked(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Like :meth:`run`, kernel by kernel, stopping at the first kernel that writes a NaN or
        an infinity; the error names the kernel and the op and source line inside it that
        produced it first (found by replaying the kernel's nodes with the reference ops)."""
        if self._device:
            raise InputError(f"checking kernel by kernel (--check) runs on the CPU backend, not {self.backend.name}: "
                             "compile for target='cpu' to find the op that makes a NaN")
        sizes, arrays = self.bind(feeds)
        self._compile_kernels()
        updated = {old for old, new in self.graph.updates if new is not old}
        before = {v: arrays[self._arg_index[v]].copy() for v in self.graph.outputs if v in updated}
        env: dict[str, object] = dict(sizes)
        values = {v: a for (_, v), a in zip(self.graph.args, arrays, strict=True)}
        values.update((v, arrays[b].reshape(v.type.concrete(sizes)) if isinstance(b, int) else b)
                      for v, b in zip(self.kernels.buffers, self.buffers(sizes), strict=True))
        arg = self.backend.argument
        env.update({arg(v): a for v, a in values.items()})
        for item in self.kernels.schedule:
            if hasattr(item, "anchors") and "host" in get_op(item.nodes[0].op).lowering:  # an all-reduce, at once
                from gradfuse.runtime import distributed

                (n,) = item.nodes
                distributed.start(n.attrs["bucket"], (values[n.outputs[0]],), (values[n.inputs[0]],), n.attrs["ranks"])
                distributed.wait(n.attrs["bucket"])
                continue
            if not hasattr(item, "anchors"):  # a view
                values[item.outputs[0]] = values[item.inputs[0]].reshape(item.outputs[0].type.concrete(sizes))
                env[arg(item.outputs[0])] = values[item.outputs[0]]
                continue
            overwritten = {v: values[v].copy() for v in item.reads  # updated in place: replay needs the old values
                           if any(np.shares_memory(values[v], values[w]) for w in item.writes)}
            getattr(self.module, item.name)(*(env[p] for p in self.backend.kernel_arguments(item)),
                                            *self._literals(item))
            unwritten = self.backend.unwritten(item, self.kernels)  # e.g. a gradient that never leaves BLAS
            bad = [v for v in item.writes if v.type.dtype.is_float and v is not unwritten
                   and not np.all(np.isfinite(values[v]))]
            if bad:
                raise NumericError(self._explain_nonfinite(item, {**values, **overwritten}, sizes, get_op))
        for old, new in self.graph.updates:
            if new is not old:
                values[old][...] = values[new]
        return [before[v] if v in before else values[v].copy() for v in self.graph.outputs]

    def profile(self, feeds: Mapping[str, np.ndarray], steps: int = 5) -> dict[str, float]:
        """Seconds per kernel, the median of ``steps`` runs after one warm-up run (which compiles),
        calling the kernels one by one as :meth:`run_checked` does (in the schedule's order, without its
        checks). Kernels that update params and state in place write into the arrays of ``feeds``;
        the other updates are not copied back: the numbers of a timed step do not matter."""
        sizes, arrays = self.bind(feeds)
        values = {v: a for (_, v), a in zip(self.graph.args, arrays, strict=True)}
        values.update((v, arrays[b].reshape(v.type.concrete(sizes)) if isinstance(b, int) else b)
                      for v, b in zip(self.kernels.buffers, self.buffers(sizes), strict=True))
        arg = self.backend.argument
        env: dict[str, object] = dict(sizes)
        env.update({arg(v): a for v, a in values.items()})
        times: dict[str, list[float]] = {}
        for run in range(steps + 1):
            for item in self.kernels.schedule:
                if not hasattr(item, "anchors"):  # a view
                    values[item.outputs[0]] = values[item.inputs[0]].reshape(item.outputs[0].type.concrete(sizes))
                    env[arg(item.outputs[0])] = values[item.outputs[0]]
                    continue
                kernel = getattr(self.module, item.name)
                args = [env[p] for p in self.backend.kernel_arguments(item)] + list(self._literals(item))
                start = time.perf_counter()
                kernel(*args)
                if run:
                    times.setdefault(item.name, []).append(time.perf_counter() - start)
        return {name: float(np.median(t)) for name, t in times.items()}

    def _explain_nonfinite(self, kernel, values, sizes, get_op) -> str:
        """Replay the kernel's nodes in numpy to find the first one whose result is not finite."""
        from gradfuse.ir.interpreter import concrete_attrs

        env = dict(values)
        producers = self.graph.producers()
        for n in kernel.nodes:
            for v in n.inputs:
                if v not in env:  # a scalar constant or a count
                    p = producers[v]
                    env[v] = get_op(p.op).run_ref([env[u] for u in p.inputs],
                                                  concrete_attrs(p.attrs, get_op(p.op).attrs, sizes))[0]
            opdef = get_op(n.op)
            with np.errstate(all="ignore"):
                outs = opdef.run_ref([env[v] for v in n.inputs], concrete_attrs(n.attrs, opdef.attrs, sizes))
            for v, a in zip(n.outputs, outs, strict=True):
                env[v] = np.asarray(a)
                if v.type.dtype.is_float and not np.all(np.isfinite(a)):
                    bad_in = [f"%{u.name}" for u in n.inputs
                              if u.type.dtype.is_float and not np.all(np.isfinite(env[u]))]
                    where = f" at {n.loc}" + (f" in {n.scope}" if n.scope else "") if n.loc else ""
                    largest = max((float(np.max(np.abs(env[u]))) for u in n.inputs
                                   if u.type.dtype.is_float and np.size(env[u])), default=0.0)
                    cause = f"its input {', '.join(bad_in)} is not finite" if bad_in else \
                        f"from finite inputs, the largest of magnitude {largest:.3g}"
                    return (f"kernel {kernel.name}: %{v.name} = {n.op}{where} produced NaN/Inf ({cause}; "
                            f"{int(np.sum(~np.isfinite(a)))} of {a.size} elements)" +
                            (f" [{n.note}]" if n.note else ""))
        return f"kernel {kernel.name} wrote NaN/Inf, but replaying its ops in numpy did not (a codegen bug?)"


__all__ = ["Program"]
