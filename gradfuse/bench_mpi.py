"""The data-parallel benchmark (``gradfuse bench --only mpi``): one training step at 1 and 2 ranks
(``mpiexec -n 2``, each rank one thread, so that the comparison is fair on 2 cores), the time of
the step's all-reduces on their own, and how much of it the backward hid.

Per model and bucket size, on rank 0 (medians over the timed steps):

- ``step, 1 rank``: the step of the ordinary program on the global batch B;
- ``step, 2 ranks``: the step of one rank on B/2, all-reduces included;
- ``all-reduce alone``: the same buckets all-reduced back to back with nothing else to do;
- ``exposed``: what the step waited for at its ``wait`` calls, and the time spent in the ``Test``
  calls between kernels; ``hidden`` = alone - exposed - Test calls, the part that ran behind
  the backward (on one 2-core machine the ranks' own cores move the data: the kernels slow down
  instead); and ``exposed, no Test``: the same without the
  ``MPI_Testall`` between kernels (Open MPI then progresses the all-reduce only at the wait).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

SINGLE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
MODELS = {"mlp 784-512-512-10": (784, 512, 512, 10), "mlp 784-2048x3-10": (784, 2048, 2048, 2048, 10)}
BATCH = 256


def _model(sizes):
    import gradfuse as gf
    from gradfuse import functional as F
    from gradfuse import nn

    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return gf.Model(nn.Sequential(*layers), inputs={"x": f"f32[N,{sizes[0]}]"}, targets={"y": "i64[N]"},
                    loss=F.cross_entropy, name="mlp")


def worker(name: str, bucket_mb: float, steps: int) -> dict:
    """One rank's measurements (run under mpiexec, or alone for 1 rank)."""
    import gradfuse as gf
    from gradfuse.runtime import distributed

    w = distributed.world()
    size, rank = (w.size, w.rank) if w is not None else (1, 0)
    compiled = gf.compile(_model(MODELS[name]), gf.SGD(momentum=0.9), workers=size, bucket_mb=bucket_mb)
    rng = np.random.default_rng(rank)
    n = BATCH // size
    x = rng.standard_normal((n, MODELS[name][0])).astype(np.float32)
    y = rng.integers(0, MODELS[name][-1], n)
    out = {"ranks": size, "bucket_mb": bucket_mb}

    def timed(progress: bool) -> tuple[float, float]:
        if w is not None:
            w.progress_enabled = progress
            w.barrier("the benchmark's start")
        for _ in range(3):
            compiled.train_step(x, y, lr=1e-4)
        if w is not None:
            w.stats.reset()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            compiled.train_step(x, y, lr=1e-4)
            times.append(time.perf_counter() - t)
        wait = w.stats.wait_seconds / steps if w is not None else 0.0
        if w is not None:
            out["in_test" if progress else "in_test_no_test"] = w.stats.progress_seconds / steps
        return statistics.median(times), wait

    out["step"], out["exposed"] = timed(True)
    if w is not None:
        out["buckets"] = w.stats.buckets // steps
        out["bytes"] = w.stats.bytes // steps
        out["progress_calls"] = w.stats.progress_calls // steps
        out["step_no_test"], out["exposed_no_test"] = timed(False)
        out["alone"] = _allreduce_alone(w, compiled, steps)
    return out


def _allreduce_alone(w, compiled, steps: int) -> float:
    """The step's buckets all-reduced back to back (Iallreduce, then wait for all), per step."""
    from mpi4py import MPI

    sizes: dict[int, int] = {}
    for node in compiled.train_program.graph.nodes:
        if node.op == "allreduce":
            sizes[node.attrs["bucket"]] = sizes.get(node.attrs["bucket"], 0) + node.outputs[0].type.nbytes({})
    bufs = [np.zeros(s // 4, np.float32) for _, s in sorted(sizes.items())]
    times = []
    for i in range(steps + 3):
        w.barrier("the all-reduce timing")
        t = time.perf_counter()
        MPI.Request.Waitall([w.comm.Iallreduce(MPI.IN_PLACE, b, op=MPI.SUM) for b in bufs])
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _run(ranks: int, name: str, bucket_mb: float, steps: int) -> dict:
    from gradfuse.runtime.distributed import mpiexec_command

    cmd = (mpiexec_command(ranks) if ranks > 1 else []) + [
        sys.executable, "-m", "gradfuse.bench_mpi", "--worker", name, str(bucket_mb), str(steps)]
    env = {**os.environ, **SINGLE_THREAD}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("{")), None)
    if result.returncode or line is None:
        raise RuntimeError(f"bench mpi ({' '.join(cmd)}) failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(line)


def bench_mpi(quick: bool):
    from gradfuse.bench import Measurement

    steps = 10 if quick else 30
    rows = []
    for name in MODELS:
        one = _run(1, name, 25.0, steps)
        rows.append(Measurement(f"data-parallel {name}, global batch {BATCH}, SGD", "gradfuse, 1 rank", one["step"],
                                "per step, one thread"))
        for bucket_mb in (25.0, 1.0):
            two = _run(2, name, bucket_mb, steps)
            b = f"{two['buckets']} bucket(s) of <= {bucket_mb:g} MB, {two['bytes'] / 1e6:.1f} MB"
            hidden = max(two["alone"] - two["exposed"] - two["in_test"], 0.0)
            title = f"data-parallel {name}, global batch {BATCH}, SGD"
            rows += [
                Measurement(title, f"2 ranks, {bucket_mb:g} MB buckets",
                            two["step"], f"per step of a rank (batch {BATCH // 2}), {b}; speed-up "
                                         f"{one['step'] / two['step']:.2f}x"),
                Measurement(title, f"  all-reduce alone ({bucket_mb:g} MB)",
                            two["alone"], "the same buckets, nothing else running"),
                Measurement(title, f"  exposed in the step ({bucket_mb:g})",
                            two["exposed"], f"waited for, + {two['in_test'] * 1e3:.2f} ms in {two['progress_calls']} "
                                            f"Test calls; hidden behind the backward: {hidden * 1e3:.2f} ms "
                                            f"({100 * hidden / two['alone'] if two['alone'] else 0:.0f}%)"),
                Measurement(title, f"  exposed, no Test ({bucket_mb:g})",
                            two["exposed_no_test"], f"without MPI_Testall between kernels; step "
                                                    f"{two['step_no_test'] * 1e3:.2f} ms"),
            ]
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        result = worker(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
        from gradfuse.runtime import distributed

        w = distributed.world()
        if w is None or w.rank == 0:
            print(json.dumps(result), flush=True)
        if w is not None:
            w.barrier("the end of the benchmark")
