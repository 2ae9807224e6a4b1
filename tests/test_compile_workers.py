"""Cold compiles split between this process and worker processes (runtime/compile_workers.py):
the workers' kernels reach this process through Numba's on-disk cache, and compute the same."""

from __future__ import annotations

import os

import numpy as np

import gradfuse as gf
from gradfuse import nn
from gradfuse.runtime import compile_workers
from gradfuse.runtime.artifact import warm_up


class Activations(nn.Module):
    """Four layers with four activations: a dozen kernels of distinct code."""

    def __init__(self):
        self.a, self.b, self.c, self.d = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        f = gf.functional
        return self.d(f.relu(f.gelu(self.c(f.sigmoid(self.b(f.tanh(self.a(x))))))))


def _model():
    return gf.Model(Activations(), inputs={"x": "f32[N,6]"}, targets={"y": "f32[N,3]"}, loss=gf.functional.mse_loss)


def _kernels(compiled):
    programs = (compiled.predict_program, compiled.train_program)
    return list({id(fn): (fn, sig) for p in programs for fn, sig in p.distinct_kernels()}.values())


def test_a_cold_compile_shares_its_kernels_with_a_worker_and_computes_the_same(tmp_path):
    compiled = gf.compile(_model(), gf.SGD(), cache_dir=str(tmp_path / "workers"))
    kernels = _kernels(compiled)
    workers = compile_workers._workers(len(kernels))
    warm_up(compiled)
    hits = [fn for fn, _ in kernels if sum(fn.stats.cache_hits.values())]  # loaded, compiled elsewhere
    if workers:
        assert 0 < len(hits) < len(kernels)
    else:
        assert not hits
    reference = gf.compile(_model(), gf.SGD(), cache_dir=str(tmp_path / "alone"))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 6), dtype=np.float32), rng.standard_normal((5, 3), dtype=np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(compiled.train_step(x, y, lr=0.1), reference.train_step(x, y, lr=0.1))
    np.testing.assert_array_equal(compiled.predict(x), reference.predict(x))


def test_the_split_balances_bytecode_and_starts_workers_behind():
    def small(a):
        return a

    def large(a, b, c):
        return (a + b) * c - (a - b) * c + a * b * c - a / (b + c) + (a * a - b * b) / (c * c + 1)

    class Fn:
        def __init__(self, f):
            self.py_func = f

    items = [(Fn(large), []) for _ in range(4)] + [(Fn(small), []) for _ in range(6)]
    mine, theirs = compile_workers._split(items, 1)
    cost = [sum(len(fn.py_func.__code__.co_code) for fn, _ in share) for share in (mine, theirs)]
    assert sorted(map(id, mine + theirs)) == sorted(map(id, items))
    assert cost[0] > cost[1]  # this process takes more: the worker starts late
    assert compile_workers._split(items, 0) == [items]


def test_workers_start_only_for_enough_kernels(monkeypatch):
    monkeypatch.delenv("GRADFUSE_COMPILE_WORKERS", raising=False)
    assert compile_workers._workers(0) == compile_workers._workers(2 * compile_workers.WORKER_MIN - 1) == 0
    assert compile_workers._workers(2 * compile_workers.WORKER_MIN) == (1 if os.cpu_count() > 1 else 0)
    monkeypatch.setenv("GRADFUSE_COMPILE_WORKERS", "0")
    assert compile_workers._workers(100) == 0
