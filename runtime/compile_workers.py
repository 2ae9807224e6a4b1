"""Cold compiles on every core. Numba compiles one function at a time (under a process-wide lock),
so a cold compile of a program's distinct kernels uses one core. Here the kernels that Numba's
on-disk cache does not hold yet are split between this process and worker processes: each
compiles its share into the cache (one index file per function, so no two processes write the
same file), and this process then loads the workers' share from the cache, which takes
milliseconds a kernel. With everything cached (a warm start) no worker starts.

A worker costs a Python start and ``import numba`` (~0.5 s), so workers start only where there
are at least WORKER_MIN kernels for each; ``GRADFUSE_COMPILE_WORKERS`` caps their number (0:
none). A worker that fails costs nothing but time: whatever it did not compile, this process
compiles itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

WORKER_MIN = 4  # uncached kernels per worker, at least
WORKER_START = 1.5  # a worker's start-up (Python, numpy, Numba), in kernels' compile times
WORKER_TIMEOUT = 30  # seconds, for a worker's start and then for each of its kernels: a hung one is killed

_WORKER = r"""
import json, sys
work = json.loads(sys.stdin.read())
sys.path[:] = work["sys.path"]  # gradfuse and the generated modules found as the parent finds them
import numpy as np
from numba import from_dtype, types
from gradfuse.codegen.cpu import CPUBackend

modules = {}
for path, name, signature in work["kernels"]:
    if path not in modules:
        modules[path] = CPUBackend.import_file(path)
    getattr(modules[path], name).compile(tuple(
        types.int64 if rank is None else types.Array(from_dtype(np.dtype(dtype)), rank, "C")
        for dtype, rank in signature))
"""


def _cached(fn) -> bool:
    """Whether Numba's on-disk cache has an index for ``fn`` (True where that cannot be told:
    such a kernel is compiled here, as without workers)."""
    index = getattr(getattr(getattr(fn, "_cache", None), "_cache_file", None), "_index_path", None)
    return index is None or os.path.exists(index)


def _job(fn, sig) -> list:
    """What a worker needs to compile ``fn`` under ``sig``: its module file, name and argument types."""
    code = fn.py_func.__code__
    return [code.co_filename, fn.py_func.__name__,
            [[None, None] if not hasattr(t, "ndim") else [str(t.dtype), t.ndim] for t in sig]]


def _workers(jobs: int) -> int:
    """How many workers for ``jobs`` uncached kernels: one less than the cores, or
    ``GRADFUSE_COMPILE_WORKERS`` (0: this process compiles everything, as Numba alone does)."""
    limit = os.environ.get("GRADFUSE_COMPILE_WORKERS")
    most = int(limit) if limit and limit.isdigit() else (os.cpu_count() or 1) - 1
    return max(0, min(most, jobs // WORKER_MIN - 1))


def _split(kernels: list, workers: int) -> list[list]:
    """``kernels`` in ``workers + 1`` shares of about equal compile time, the first this
    process's: the longest first, each to the least loaded (a kernel's bytecode size stands for
    its compile time; a worker starts behind by WORKER_START kernels of average size)."""
    def cost(item) -> int:
        return len(item[0].py_func.__code__.co_code)

    if not workers:
        return [list(kernels)]
    start = WORKER_START * sum(map(cost, kernels)) / len(kernels)
    loads, shares = [0.0] + [start] * workers, [[] for _ in range(workers + 1)]
    for item in sorted(kernels, key=cost, reverse=True):
        least = loads.index(min(loads))
        shares[least].append(item)
        loads[least] += cost(item)
    return shares


def compile_all(kernels: list[tuple[object, list]], progress=None) -> None:
    """Compile (or load from Numba's cache) each ``(dispatcher, argument types)``, calling
    ``progress()`` after each; the uncached ones partly in worker processes."""
    cold = [(fn, sig) for fn, sig in kernels if not _cached(fn)]
    shares = _split(cold, _workers(len(cold)))[1:]  # the first is this process's
    started = []
    for share in shares:
        child = None
        try:
            child = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
            child.stdin.write(json.dumps({"sys.path": sys.path, "kernels": [_job(fn, sig) for fn, sig in share]}))
            child.stdin.close()
            started.append((child, share))
        except OSError:  # no process to spare: this one compiles the rest
            if child is not None:
                child.kill()
            break
    theirs = {id(fn) for _, share in started for fn, _ in share}
    mine = [(fn, sig) for fn, sig in kernels if id(fn) not in theirs]
    for fn, sig in mine + [(fn, sig) for fn, sig in kernels if id(fn) in theirs]:
        if id(fn) in theirs and started:
            for child, share in started:  # the workers' share: loaded from the cache once they are done
                try:
                    child.wait(timeout=WORKER_TIMEOUT + WORKER_TIMEOUT * len(share))
                except subprocess.TimeoutExpired:  # stuck: what it did not write, this process compiles
                    child.kill()
            started = []
        try:
            fn.compile(tuple(sig))
        except Exception:  # noqa: BLE001 - the first run compiles it lazily instead (and says why)
            pass
        if progress is not None:
            progress()
