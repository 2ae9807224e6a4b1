"""Benchmarks: gradfuse beside hand-written numpy (always) and PyTorch / JAX (when installed),
measured in the same run, with compile time reported apart from run time.

    gradfuse bench [--only NAME ...] [--json out.json] [--quick]

Each benchmark prints a table; ``ratio`` is the reference's time over gradfuse's (above 1:
gradfuse is faster).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

import gradfuse as gf
from gradfuse import functional as F
from gradfuse import nn
from gradfuse.files import atomic_file, check_writable


@dataclass
class Measurement:
    benchmark: str
    implementation: str
    seconds: float  # median of the timed runs
    note: str = ""


def timeit(fn: Callable[[], object], min_seconds: float = 0.5, min_runs: int = 5) -> float:
    """Median wall time of ``fn`` after two warm-up calls. Each implementation is timed in a block
    of its own, after a pause: PyTorch's and JAX's worker threads spin for a while after a call,
    and timed in alternation with them, every implementation measured their interference."""
    time.sleep(0.2)
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) > 10000:
            break
    return statistics.median(times)


def side_by_side(benchmark: str, fns: dict[str, Callable[[], object]], min_seconds: float,
                 rounds: int = 2) -> list[Measurement]:
    """Each implementation timed in blocks of its own (``timeit``), the blocks taken in turn
    ``rounds`` times (A B C A B C); each keeps its best block. This 2-core machine drifts by 10-20%
    between seconds, so a single block per implementation compared moments, not implementations."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best.get(name, math.inf), timeit(fn, min_seconds / rounds))
    return [Measurement(benchmark, name, seconds) for name, seconds in best.items()]


# ---- the MLP of the issue: 784-512-512-10, ReLU, softmax cross-entropy ---------------------
class MLP(nn.Module):
    def __init__(self, sizes=(784, 512, 512, 10)):
        self.layers = nn.Sequential(*[m for i in range(len(sizes) - 1) for m in
                                      ([nn.Linear(sizes[i], sizes[i + 1])] +
                                       ([nn.ReLU()] if i < len(sizes) - 2 else []))])

    def forward(self, x):
        return self.layers(x)


def mlp_model() -> gf.Model:
    return gf.Model(MLP(), inputs={"x": "f32[N,784]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy, name="mlp")


class NumpyMLP:
    """The same network by hand, as a practitioner writes it: BLAS matmuls, in-place updates."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.w = [weights[f"layers.{i}.weight"].copy() for i in (0, 2, 4)]
        self.b = [weights[f"layers.{i}.bias"].copy() for i in (0, 2, 4)]

    def predict(self, x):
        h = x
        for i in range(3):
            h = h @ self.w[i]
            h += self.b[i]
            if i < 2:
                np.maximum(h, 0, out=h)
        return h

    def train_step(self, x, y, lr):
        acts, h = [x], x
        for i in range(3):
            h = h @ self.w[i]
            h += self.b[i]
            if i < 2:
                np.maximum(h, 0, out=h)
            acts.append(h)
        z = acts[-1]
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        n = len(y)
        loss = -np.log(p[np.arange(n), y]).mean()
        g = p
        g[np.arange(n), y] -= 1
        g /= n
        for i in (2, 1, 0):
            dw = acts[i].T @ g
            db = g.sum(axis=0)
            if i:
                g = g @ self.w[i].T
                g *= acts[i] > 0
            self.w[i] -= lr * dw
            self.b[i] -= lr * db
        return loss


def _torch():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1)))
    return torch


def _jax():
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    return jax, jnp


def bench_mlp(quick: bool) -> list[Measurement]:
    model = mlp_model()
    out: list[Measurement] = []
    start = time.perf_counter()
    compiled = gf.compile(model, gf.SGD())
    out.append(Measurement("mlp compile (in process)", "gradfuse", time.perf_counter() - start,
                           "trace + passes + codegen; Numba compiles on the first call"))
    rng = np.random.default_rng(0)
    x256 = rng.standard_normal((256, 784), dtype=np.float32)
    y256 = rng.integers(0, 10, 256)
    first = time.perf_counter()
    compiled.train_step(x256, y256, lr=1e-3)
    out.append(Measurement("mlp first train step (JIT)", "gradfuse", time.perf_counter() - first))
    ref = NumpyMLP(model.initial_values())
    min_s = 0.3 if quick else 1.0
    name = "mlp 784-512-512-10 train step, batch 256"
    steps = {"gradfuse": lambda: compiled.train_step(x256, y256, lr=1e-3),
             "numpy": lambda: ref.train_step(x256, y256, 1e-3)}
    torch = _torch()
    if torch is not None:
        net = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                  torch.nn.ReLU(), torch.nn.Linear(512, 10))
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        tx, ty = torch.from_numpy(x256), torch.from_numpy(y256)

        def torch_step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(tx), ty)
            loss.backward()
            opt.step()
            return loss

        steps["pytorch eager"] = torch_step
    jx = _jax()
    if jx is not None:
        jax, jnp = jx
        params = [(jnp.asarray(ref.w[i]), jnp.asarray(ref.b[i])) for i in range(3)]

        def loss_fn(ps, x, y):
            h = x
            for i, (w, b) in enumerate(ps):
                h = h @ w + b
                if i < 2:
                    h = jax.nn.relu(h)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))

        @jax.jit
        def jax_step(ps, x, y):
            grads = jax.grad(loss_fn)(ps, x, y)
            return [(w - 1e-3 * gw, b - 1e-3 * gb) for (w, b), (gw, gb) in zip(ps, grads, strict=True)]

        jxs, jys = jnp.asarray(x256), jnp.asarray(y256)
        state = {"p": params}

        def run_jax():
            state["p"] = jax_step(state["p"], jxs, jys)
            jax.block_until_ready(state["p"])

        steps["jax jit"] = run_jax
    out += side_by_side(name, steps, min_s)
    train = name
    for batch in (1, 1024):
        xb = rng.standard_normal((batch, 784), dtype=np.float32)
        name = f"mlp inference, batch {batch}"
        predicts = {"gradfuse": lambda xb=xb: compiled.predict(xb), "numpy": lambda xb=xb: ref.predict(xb)}
        if torch is not None:
            txb = torch.from_numpy(xb)

            def torch_predict(txb=txb):
                with torch.no_grad():
                    return net(txb)

            predicts["pytorch eager"] = torch_predict
        out += side_by_side(name, predicts, min_s)
    # the peak last: OpenBLAS's threads spin a while after a big GEMM, which would tax whatever ran next
    peak, flops = sgemm_peak(), mlp_train_flops((784, 512, 512, 10), 256)
    reached = flops / next(m.seconds for m in out if m.benchmark == train and m.implementation == "gradfuse")
    out.insert(max(i for i, m in enumerate(out) if m.benchmark == train) + 1,
               Measurement(train, "sgemm peak (numpy, 2048³)", flops / peak,
                           f"{peak / 1e9:.0f} GFLOP/s measured; gradfuse reaches {reached / 1e9:.0f} GFLOP/s "
                           f"= {reached / peak:.0%}"))
    return out


# ---- GELU followed by LayerNorm over the last axis of a 4096x1024 tensor --------------------
class GeluLayerNorm(nn.Module):
    def __init__(self, dim: int):
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(F.gelu(x, approximate="tanh"))


def numpy_gelu_layernorm(x, gamma, beta, eps=1e-5):
    h = 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x ** 3)))
    mean = h.mean(axis=-1, keepdims=True)
    var = h.var(axis=-1, keepdims=True)
    return (h - mean) / np.sqrt(var + eps) * gamma + beta


def sgemm_peak(n: int = 2048) -> float:
    """FLOP/s of a large square float32 matmul through numpy (its OpenBLAS), measured now."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)
    return 2 * n ** 3 / min(timeit(lambda: np.matmul(a, a, out=c), 0.25) for _ in range(2))


def mlp_train_flops(sizes, batch: int) -> int:
    """Matmul FLOPs of one training step: forward, weight gradients, and input gradients of every
    layer but the first (nothing needs ∂L/∂x)."""
    pairs = list(zip(sizes[:-1], sizes[1:], strict=False))
    forward = sum(2 * batch * i * o for i, o in pairs)
    return 3 * forward - 2 * batch * pairs[0][0] * pairs[0][1]


def measured_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes per second of a parallel streaming copy (read + write), measured now."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def copy(src, dst):
        for i in prange(src.size):
            dst[i] = src[i]

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    seconds = min(timeit(lambda: copy(src, dst), 0.25) for _ in range(2))  # best block, as side_by_side
    return 2 * src.nbytes / seconds


def bench_gelu_layernorm(quick: bool) -> list[Measurement]:
    rows, dim = 4096, 1024
    model = gf.Model(GeluLayerNorm(dim), inputs={"x": f"f32[N,{dim}]"}, name="gelu_layernorm")
    compiled = gf.compile(model)
    x = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    gamma, beta = compiled.weights["norm.weight"], compiled.weights["norm.bias"]
    got, want = compiled.predict(x), numpy_gelu_layernorm(x, gamma, beta)
    error = float(np.abs(got - want).max())
    name = f"gelu(tanh) + layernorm forward, {rows}x{dim} f32"
    min_s = 0.3 if quick else 1.0
    fns = {"gradfuse": lambda: compiled.predict(x), "numpy": lambda: numpy_gelu_layernorm(x, gamma, beta)}
    torch = _torch()
    if torch is not None:
        tx, ln = torch.from_numpy(x), torch.nn.LayerNorm(dim)

        def torch_fn():
            with torch.no_grad():
                return ln(torch.nn.functional.gelu(tx, approximate="tanh"))

        fns["pytorch eager"] = torch_fn
    jx = _jax()
    if jx is not None:
        jax, jnp = jx

        @jax.jit
        def jax_fn(x):
            h = jax.nn.gelu(x, approximate=True)
            mean = h.mean(-1, keepdims=True)
            return (h - mean) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)

        jxa = jnp.asarray(x)
        fns["jax jit"] = lambda: jax_fn(jxa).block_until_ready()
    out = side_by_side(name, fns, min_s)
    out[0].note = f"max |error| {error:.1e}"
    bandwidth = measured_bandwidth()
    moved = 2 * x.nbytes  # read x, write y
    seconds = out[0].seconds
    out.append(Measurement(name, "memory bandwidth (streaming copy)", moved / bandwidth,
                           f"{bandwidth / 1e9:.1f} GB/s measured; gradfuse reaches {moved / seconds / 1e9:.1f} GB/s "
                           f"= {moved / seconds / bandwidth:.0%}"))
    return out


# ---- a small CNN: the digits CNN of examples/digits_cnn.py, one training step at batch 256 ------
class CNN(nn.Module):
    def __init__(self, c: int = 16, method: str = "auto"):
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1, method=method), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1, method=method), nn.ReLU(), nn.MaxPool2d(2))
        self.flatten = nn.Flatten()
        self.head = nn.Linear(2 * c * 2 * 2, 10)

    def forward(self, x):
        return self.head(self.flatten(self.features(x)))


def cnn_model(method: str = "auto") -> gf.Model:
    return gf.Model(CNN(method=method), inputs={"x": "f32[N,1,8,8]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy,
                    name="cnn" if method == "auto" else f"cnn_{method}")


def cnn_train_flops(batch: int, c: int = 16) -> int:
    """Multiply-adds x 2 of the convolutions and the head: forward, weight gradients, and input
    gradients of every layer but the first."""
    conv1, conv2, head = 2 * batch * 64 * c * 9, 2 * batch * 16 * 2 * c * c * 9, 2 * batch * 8 * c * 10
    return 3 * (conv1 + conv2 + head) - conv1


def _torch_cnn(torch, weights: dict[str, np.ndarray]):
    """The same network in PyTorch, under the same attribute names, starting from gradfuse's weights."""
    T = torch.nn

    class Net(T.Module):
        def __init__(self, c: int = 16):
            super().__init__()
            self.features = T.Sequential(T.Conv2d(1, c, 3, padding=1), T.BatchNorm2d(c), T.ReLU(), T.MaxPool2d(2),
                                         T.Conv2d(c, 2 * c, 3, padding=1), T.ReLU(), T.MaxPool2d(2))
            self.flatten, self.head = T.Flatten(), T.Linear(2 * c * 2 * 2, 10)

        def forward(self, x):
            return self.head(self.flatten(self.features(x)))

    net = Net()
    net.load_state_dict(gf.to_pytorch(weights, CNN(), tensors=True), strict=False)  # num_batches_tracked: its own
    return net


def bench_cnn(quick: bool) -> list[Measurement]:
    with tempfile.TemporaryDirectory(prefix="gradfuse-bench-cnn-") as cache:
        return _bench_cnn(quick, cache)


def _bench_cnn(quick: bool, cache: str) -> list[Measurement]:
    batch, out = 256, []
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    name = f"cnn (digits CNN: 2 conv3x3, BatchNorm2d, max-pool) train step, batch {batch}"
    steps, compiled = {}, {}
    out += _fresh_process_compiles("cnn", _CNN_COMPILE_SCRIPT)
    for method in ("auto", "direct"):
        label = "gradfuse" if method == "auto" else "gradfuse, direct conv loops"
        m = compiled[method] = gf.compile(cnn_model(method), gf.SGD(), cache_dir=cache)
        steps[label] = lambda m=m: m.train_step(x, y, lr=1e-3)
    torch = _torch()
    if torch is not None:
        net = _torch_cnn(torch, compiled["auto"].state_dict())
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)

        def torch_step(model=net):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(tx), ty)
            loss.backward()
            opt.step()
            return loss

        steps["pytorch eager"] = torch_step
        try:
            start = time.perf_counter()
            fast = torch.compile(net)
            torch_step(fast)
            out.append(Measurement("cnn train-step compile, torch.compile", "pytorch", time.perf_counter() - start,
                                   "torch.compile(net) + first step"))
            steps["torch.compile"] = lambda: torch_step(fast)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, ...: say so, measure the rest
            out.append(Measurement(name, "torch.compile", math.nan, f"failed: {type(e).__name__}: {str(e)[:80]}"))
    if _jax() is not None:
        from gradfuse.bench_jax import cnn_step

        steps["jax jit"], first = cnn_step(compiled["auto"].weights, x, y)
        out.append(Measurement("cnn train-step compile, jax jit", "jax", first, "jax.jit: trace, XLA, first step"))
    rows = side_by_side(name, steps, 0.3 if quick else 1.0)
    if _jax() is None:
        rows.append(Measurement(name, "jax jit", math.nan, "not measured: JAX is not installed (.[bench] has it)"))
    peak, flops = sgemm_peak(), cnn_train_flops(batch)
    reached = flops / rows[0].seconds
    rows.append(Measurement(name, "sgemm peak (numpy, 2048³)", flops / peak,
                            f"{peak / 1e9:.0f} GFLOP/s measured; gradfuse reaches {reached / 1e9:.1f} GFLOP/s "
                            f"= {reached / peak:.0%}"))
    return out + rows


# ---- compile time: cold (empty cache) and warm (Numba's on-disk cache) in fresh processes -----
_COMPILE_SCRIPT = """
import time, numpy as np
t = time.perf_counter()
import gradfuse as gf
from gradfuse.bench import mlp_model
m = gf.compile(mlp_model(), gf.SGD(), cache_dir={cache!r})
m.train_step(np.zeros((256, 784), np.float32), np.zeros(256, np.int64), lr=0.0)
print(time.perf_counter() - t)
"""


# ---- a pre-LayerNorm transformer block training step ---------------------------------------------
BLOCK = {"seq": 128, "width": 256, "heads": 4, "hidden": 1024, "batch": 16}


class TransformerBlock(nn.Module):
    """x + MHSA(LN(x)), then h + MLP(LN(h)) with a GELU MLP (the issue's benchmark block)."""

    def __init__(self, width: int = BLOCK["width"], heads: int = BLOCK["heads"], hidden: int = BLOCK["hidden"]):
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiHeadSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        h = x + self.attn(self.norm1(x))
        return h + self.mlp(self.norm2(h))


def transformer_block_model() -> gf.Model:
    t, d = BLOCK["seq"], BLOCK["width"]
    return gf.Model(TransformerBlock(), inputs={"x": f"f32[N,{t},{d}]"}, targets={"y": f"f32[N,{t},{d}]"},
                    loss=F.mse_loss)


def block_train_flops(b=BLOCK) -> int:
    """Matmul FLOPs of one step: 3x the forward (forward, input and weight gradients; the block's
    input gradient is computed too, as the other frameworks do)."""
    n, t, d, f = b["batch"], b["seq"], b["width"], b["hidden"]
    rows = n * t
    projections = 2 * rows * d * d * 4 + 2 * rows * d * f * 2
    attention = 2 * n * t * t * d * 2  # scores and mixing, over all heads
    return 3 * (projections + attention)


def _torch_block(torch, weights: dict[str, np.ndarray]):
    """The same block in PyTorch, from gradfuse's initial weights ([in, out] -> [out, in])."""
    b = BLOCK

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = torch.nn.LayerNorm(b["width"]), torch.nn.LayerNorm(b["width"])
            self.attn = torch.nn.MultiheadAttention(b["width"], b["heads"], batch_first=True)
            self.fc1, self.fc2 = torch.nn.Linear(b["width"], b["hidden"]), torch.nn.Linear(b["hidden"], b["width"])

        def forward(self, x):
            y = self.norm1(x)
            h = x + self.attn(y, y, y, need_weights=False)[0]
            return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(h))))

    net = Block()
    state = gf.to_pytorch(weights, transformer_block_model())
    net.load_state_dict({k.replace("mlp.0.", "fc1.").replace("mlp.2.", "fc2."): torch.from_numpy(np.asarray(v))
                         for k, v in state.items()}, strict=False)
    return net


def bench_transformer(quick: bool) -> list[Measurement]:
    b = BLOCK
    model = transformer_block_model()
    out: list[Measurement] = []
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b["batch"], b["seq"], b["width"]), dtype=np.float32)
    y = rng.standard_normal((b["batch"], b["seq"], b["width"]), dtype=np.float32)
    start = time.perf_counter()
    compiled = gf.compile(model, gf.SGD())
    compiled.train_step(x, y, lr=1e-3)
    counts = compiled.train_program.kernel_counts
    out.append(Measurement("transformer block compile (in process)", "gradfuse", time.perf_counter() - start,
                           f"compile + first step; {counts[0]} kernels compiled, {counts[1]} reused "
                           "(cold only with an empty cache: python -m gradfuse.compile_times)"))
    name = (f"transformer block train step (pre-LN, seq {b['seq']}, width {b['width']}, {b['heads']} heads, "
            f"MLP {b['hidden']} GELU, batch {b['batch']}, MSE, SGD)")
    steps = {"gradfuse": lambda: compiled.train_step(x, y, lr=1e-3)}
    torch = _torch()
    notes = {}
    if torch is not None:
        net = _torch_block(torch, model.initial_values())
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)

        def make_step(module):
            opt = torch.optim.SGD(net.parameters(), lr=1e-3)

            def step():
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(module(tx), ty)
                loss.backward()
                opt.step()
                return loss

            return step

        steps["pytorch eager"] = make_step(net)
        if not quick:
            try:
                start = time.perf_counter()
                compiled_step = make_step(torch.compile(net))
                compiled_step()
                notes["torch.compile"] = f"compile + first step {time.perf_counter() - start:.1f} s"
                steps["torch.compile"] = compiled_step
            except Exception as e:  # noqa: BLE001 - a missing C compiler etc.: say so, measure the rest
                notes["torch.compile"] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    else:
        notes["pytorch"] = "not installed"
    if _jax() is None:
        notes["jax"] = "not installed"
    else:
        from gradfuse.bench_jax import block_step

        steps["jax jit"], first = block_step(model.initial_values(), x, y, b["heads"])
        notes["jax jit"] = f"compile + first step {first:.1f} s"
    out += side_by_side(name, steps, 0.5 if quick else 2.0)
    for m in out:
        if m.implementation in notes:
            m.note = notes[m.implementation]
    out += [Measurement(name, impl, float("nan"), note) for impl, note in notes.items() if impl not in steps]
    peak, flops = sgemm_peak(), block_train_flops()
    ours = next(m.seconds for m in out if m.benchmark == name and m.implementation == "gradfuse")
    out.append(Measurement(name, "sgemm peak (numpy, 2048³)", flops / peak,
                           f"{peak / 1e9:.0f} GFLOP/s measured; gradfuse reaches {flops / ours / 1e9:.0f} GFLOP/s "
                           f"= {flops / ours / peak:.0%} ({flops / 1e9:.1f} GFLOP per step)"))
    return out


_CNN_COMPILE_SCRIPT = """
import time, numpy as np
t = time.perf_counter()
import gradfuse as gf
from gradfuse.bench import cnn_model
m = gf.compile(cnn_model(), gf.SGD(), cache_dir={cache!r})
m.train_step(np.zeros((256, 1, 8, 8), np.float32), np.zeros(256, np.int64), lr=0.0)
print(time.perf_counter() - t)
"""


def _fresh_process_compiles(what: str, script: str) -> list[Measurement]:
    """Compile + first step in a new process, with an empty kernel cache and then with it on disk."""
    out = []
    with tempfile.TemporaryDirectory() as cache:
        for label, note in (("cold (empty cache)", "import + trace + passes + codegen + JIT + first step"),
                            ("warm (cache on disk)", "import + trace + cached IR and kernels + first step")):
            result = subprocess.run([sys.executable, "-c", script.format(cache=cache)],
                                    capture_output=True, text=True, check=True)
            out.append(Measurement(f"{what} train-step compile, {label}", "gradfuse", float(result.stdout.split()[-1]),
                                   f"new process: {note}"))
    return out


def bench_compile(quick: bool) -> list[Measurement]:
    return _fresh_process_compiles("mlp", _COMPILE_SCRIPT)


def bench_mpi(quick: bool) -> list[Measurement]:
    """Data-parallel training at 1 and 2 ranks (gradfuse/bench_mpi.py)."""
    from gradfuse.bench_mpi import bench_mpi as run

    return run(quick)


BENCHMARKS = {"mlp": bench_mlp, "transformer": bench_transformer, "gelu-layernorm": bench_gelu_layernorm,
              "cnn": bench_cnn, "compile": bench_compile, "mpi": bench_mpi}


def render(rows: list[Measurement]) -> str:
    lines = []
    by_bench: dict[str, list[Measurement]] = {}
    for r in rows:
        by_bench.setdefault(r.benchmark, []).append(r)
    for bench, ms in by_bench.items():
        lines.append(bench)
        base = next((m.seconds for m in ms if m.implementation == "gradfuse"), None)
        for m in ms:
            shown = base and m.implementation != "gradfuse" and not math.isnan(m.seconds)
            ratio = f"{m.seconds / base:6.2f}x" if shown else "       "
            t = "         - " if math.isnan(m.seconds) else f"{m.seconds * 1e3:10.3f} ms" if m.seconds < 10 else \
                f"{m.seconds:10.2f} s "
            lines.append(f"  {m.implementation:<36} {t}  {ratio}  {m.note}")
    return "\n".join(lines)


def main(only: list[str] | None = None, json_path: str | None = None, quick: bool = False) -> int:
    unknown = set(only or []) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    if json_path:
        check_writable(json_path, "benchmark results")  # before minutes of measuring
    rows: list[Measurement] = []
    for name, fn in BENCHMARKS.items():
        if only and name not in only:
            continue
        new = fn(quick)
        print(render(new), flush=True)
        rows += new
    return write_results(rows, json_path, printed=True)


def write_results(rows: list[Measurement], json_path: str | None, printed: bool = False) -> int:
    """The tables (unless ``printed`` already), the ratio's meaning, and the JSON file if asked."""
    if not printed:
        print(render(rows), flush=True)
    print("\nratio = reference time / gradfuse time (above 1: gradfuse is faster)")
    if json_path:
        with atomic_file(json_path, "benchmark results", "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return 0
