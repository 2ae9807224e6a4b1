"""Benchmarks on an NVIDIA GPU (``gradfuse bench --target cuda``): gradfuse's CUDA backend beside
PyTorch eager and ``torch.compile(mode="max-autotune-no-cudagraphs")`` on the same GPU in the same
run, with the run's own yardsticks: the HBM bandwidth of a device-to-device copy and cuBLAS's
SGEMM (TF32 off) through PyTorch.

Every implementation gets its batch already in device memory and returns its loss to the host
each step (``loss.item()``: the one sync a training loop has). The shapes are parameters, so the
simulator test can run the same code on tiny ones (the timings there mean nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

import gradfuse as gf
from gradfuse import functional as F
from gradfuse.bench import MLP, GeluLayerNorm, Measurement, mlp_train_flops, side_by_side


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _synced(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` then a wait for the device: what a timer around it must measure."""
    from numba import cuda

    def run():
        out = fn()
        cuda.synchronize()
        return out
    return run


def mlp_of(sizes) -> gf.Model:
    return gf.Model(MLP(sizes), inputs={"x": f"f32[N,{sizes[0]}]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy,
                    name="mlp")


def torch_mlp(torch, sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [torch.nn.Linear(sizes[i], sizes[i + 1])] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    return torch.nn.Sequential(*layers).cuda()


def mlp_train(batch: int, sizes=(784, 512, 512, 10), min_s: float = 1.0, compile_torch: bool = True,
              target: str = "cuda") -> list[Measurement]:
    from numba import cuda

    compiled = gf.compile(mlp_of(sizes), gf.SGD(), target=target)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], batch)
    dx, dy = cuda.to_device(x), y  # labels stay on the host: they are range-checked before a launch
    name = f"mlp {'-'.join(map(str, sizes))} train step, batch {batch} ({target})"
    fns = {"gradfuse": lambda: compiled.train_step(dx, dy, lr=1e-3)}
    cublas = with_cublas(lambda cache: gf.compile(mlp_of(sizes), gf.SGD(), target=target, cache_dir=cache)) \
        if target == "cuda" else None
    if cublas is not None:
        fns["gradfuse, cuBLAS GEMM (CuPy)"] = lambda: cublas.train_step(dx, dy, lr=1e-3)
    torch = _torch_cuda()
    if torch is not None:
        def step_of(net):
            opt = torch.optim.SGD(net.parameters(), lr=1e-3)
            tx, ty = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()

            def step():
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(net(tx), ty)
                loss.backward()
                opt.step()
                return loss.item()
            return step

        fns["pytorch eager"] = step_of(torch_mlp(torch, sizes))
        if compile_torch:
            start = time.perf_counter()
            compiled_net = torch.compile(torch_mlp(torch, sizes), mode="max-autotune-no-cudagraphs")
            fns["torch.compile"] = step_of(compiled_net)
            fns["torch.compile"]()  # compiles (and autotunes) here
            compile_s = time.perf_counter() - start
    out = side_by_side(name, fns, min_s)
    for m in out:
        if m.implementation == "torch.compile":
            m.note = f"compiled in {compile_s:.0f} s (max-autotune-no-cudagraphs)"
    flops = mlp_train_flops(sizes, batch)
    out[0].note = f"{flops / out[0].seconds / 1e12:.2f} TFLOP/s"
    return out


def with_cublas(compile_fn):
    """What ``compile_fn(cache_dir)`` compiles, its GEMMs done by cuBLAS through CuPy (None without
    CuPy): in a cache folder of its own, since a module is imported once per file."""
    import os
    import tempfile

    try:
        import cupy  # noqa: F401
    except ImportError:
        return None
    os.environ["GRADFUSE_CUDA_GEMM"] = "cublas"
    try:
        return compile_fn(tempfile.mkdtemp(prefix="gradfuse-cublas-"))
    finally:
        del os.environ["GRADFUSE_CUDA_GEMM"]


def mlp_inference(batch: int = 1, sizes=(784, 512, 512, 10), min_s: float = 1.0,
                  target: str = "cuda") -> list[Measurement]:
    """Batch-1 inference from a host array to a host array: the copies are part of it."""
    compiled = gf.compile(mlp_of(sizes), target=target)
    x = np.random.default_rng(0).standard_normal((batch, sizes[0]), dtype=np.float32)
    fns = {"gradfuse": lambda: compiled.predict(x)}
    torch = _torch_cuda()
    if torch is not None:
        net = torch_mlp(torch, sizes)

        def torch_predict():
            with torch.no_grad():
                return net(torch.from_numpy(x).cuda()).cpu()
        fns["pytorch eager"] = torch_predict
    return side_by_side(f"mlp inference, batch {batch} ({target})", fns, min_s)


def gelu_layernorm(rows: int = 4096, dim: int = 1024, min_s: float = 1.0, target: str = "cuda",
                   copy_bytes: int = 1 << 30) -> list[Measurement]:
    """The fused GELU+LayerNorm kernel with input and output in device memory, against the HBM
    bandwidth of a copy measured now."""
    from numba import cuda

    model = gf.Model(GeluLayerNorm(dim), inputs={"x": f"f32[N,{dim}]"}, name="gelu_layernorm")
    compiled = gf.compile(model, target=target)
    x = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    dx = cuda.to_device(x)
    weights = compiled.weights.for_step()
    program = compiled.predict_program
    feeds = {**weights, "x": dx}
    name = f"gelu(tanh) + layernorm forward, {rows}x{dim} f32 ({target})"
    fns = {"gradfuse": _synced(lambda: program.run_on_device(feeds))}
    torch = _torch_cuda()
    if torch is not None:
        tx, ln = torch.from_numpy(x).cuda(), torch.nn.LayerNorm(dim).cuda()

        def torch_fn():
            with torch.no_grad():
                out = ln(torch.nn.functional.gelu(tx, approximate="tanh"))
            torch.cuda.synchronize()
            return out
        fns["pytorch eager"] = torch_fn
    out = side_by_side(name, fns, min_s)
    moved = 2 * x.nbytes
    bandwidth = copy_bandwidth(copy_bytes)
    out.append(Measurement(name, "HBM bandwidth (device copy)", moved / bandwidth,
                           f"{bandwidth / 1e9:.0f} GB/s measured; gradfuse reaches "
                           f"{moved / out[0].seconds / 1e9:.0f} GB/s = {moved / out[0].seconds / bandwidth:.0%}"))
    return out


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes read and written per second by a device-to-device copy (CuPy's or PyTorch's)."""
    torch = _torch_cuda()
    if torch is None:
        from numba import cuda

        src, dst = cuda.device_array(nbytes // 4, np.float32), cuda.device_array(nbytes // 4, np.float32)
        fn = _synced(lambda: dst.copy_to_device(src))
    else:
        src, dst = torch.empty(nbytes // 4, device="cuda"), torch.empty(nbytes // 4, device="cuda")

        def fn():
            dst.copy_(src)
            torch.cuda.synchronize()
    seconds = side_by_side("copy", {"copy": fn}, 0.5)[0].seconds
    return 2 * nbytes / seconds


def sgemm_peak(n: int = 8192) -> Measurement | None:
    torch = _torch_cuda()
    if torch is None:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")

    def fn():
        a @ b
        torch.cuda.synchronize()
    seconds = side_by_side("sgemm", {"sgemm": fn}, 1.0)[0].seconds
    return Measurement(f"cuBLAS SGEMM {n}³ (TF32 off)", "pytorch", seconds,
                       f"{2 * n ** 3 / seconds / 1e12:.1f} TFLOP/s")


def main(quick: bool = False) -> list[Measurement]:
    min_s = 0.3 if quick else 1.0
    rows = mlp_train(64, (64, 128, 10), min_s)  # the digits MLP
    for batch in (256, 4096):
        rows += mlp_train(batch, min_s=min_s)
    rows += mlp_inference(1, min_s=min_s)
    rows += gelu_layernorm(min_s=min_s)
    peak = sgemm_peak()
    if peak is not None:
        rows.append(peak)
    return rows
